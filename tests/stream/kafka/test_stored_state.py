"""The stream worker's table values and stall-guard arithmetic (no broker needed)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from stream.kafka.worker import _next_offset, pack_state, unpack_state

STATE = json.dumps({"monitor": {"tiles_seen": 12, "window": [[0.125] * 64] * 8}}).encode()


def test_pack_state_is_compact_and_round_trips_with_its_position():
    value = pack_state(3, 41, STATE)
    assert len(value) < len(STATE) / 3  # deflated: the repetitive JSON of a monitor shrinks a lot
    stored = unpack_state(value)
    assert (stored.state, stored.partition, stored.offset) == (STATE, 3, 41)
    assert stored.covers(3, 41) and stored.covers(3, 7)
    assert not stored.covers(3, 42) and not stored.covers(2, 41)


def test_values_of_older_workers_still_read():
    positioned = b"TDS1" + struct.pack(">iq", 1, 9) + STATE  # uncompressed, with a position
    assert unpack_state(positioned) == unpack_state(pack_state(1, 9, STATE))
    bare = unpack_state(STATE)  # no position at all: never taken as covering a message
    assert bare.state == STATE and not bare.covers(0, 0)


def test_a_corrupt_compact_value_reaches_the_pipeline_as_unreadable_bytes_not_an_exception():
    value = pack_state(0, 5, STATE)
    broken = value[:-8] + b"\x00" * 8
    with pytest.raises(zlib.error):
        zlib.decompress(broken[16:])
    stored = unpack_state(broken)
    assert stored.offset == 5 and stored.state != STATE


@pytest.mark.parametrize(
    ("consumed", "committed", "earliest", "expected"),
    [
        (7, None, 0, 8),  # consumed here, group never committed: one past what this worker read
        (7, 5, 0, 8),  # the commit trails processing
        (2, 9, 0, 9),  # another worker went further before the partition came back: its commit wins
        (None, 4, 0, 4),  # taken over, never read by this worker: the group's committed position
        (None, None, 3, 3),  # never committed by anyone: the earliest offset still held
    ],
)
def test_stall_guard_reads_a_partition_from_past_both_what_it_consumed_and_what_the_group_committed(
    consumed, committed, earliest, expected
):
    assert _next_offset(consumed, committed, earliest) == expected
