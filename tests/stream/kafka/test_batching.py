"""``stream.batch_max_tiles`` on the real broker: the acquisitions waiting are predicted together, up to the limit.

The tiles are all on the topic before the worker starts, so the worker finds them waiting whatever its speed; the
wait (``stream.batch_wait_ms``) is long enough that a batch is handed over because it is full, not because time ran
out. Batched or not, every acquisition is predicted once and the region's monitor counts each tile once.
"""

from __future__ import annotations

import json
import re

import pytest

from stream.kafka.worker import unpack_state

pytestmark = pytest.mark.services

BATCH = re.compile(r"step of (\d+) acquisitions")


@pytest.mark.parametrize("batch_max", [1, 4])
def test_batch_max_tiles_sets_how_many_waiting_acquisitions_share_one_call(make_stack, tiles, batch_max):
    stack = make_stack(
        {"TERRADAPT_STREAM__BATCH_MAX_TILES": str(batch_max), "TERRADAPT_STREAM__BATCH_WAIT_MS": "10000"}
    )
    acqs = stack.ingest(tiles["D033"][:12], "D033")
    stack.start("worker", "worker")
    ids = {a.id for a in acqs}
    preds = stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=300)
    assert sorted(p["acquisition_id"] for p in preds) == sorted(ids)  # each once
    sizes = [int(n) for n in BATCH.findall(stack.log_text("worker"))]
    assert sum(sizes) == len(ids), sizes  # every acquisition in exactly one step
    assert max(sizes) == batch_max, sizes  # full batches of the limit, never more
    stack.wait_for(
        "predictions",
        lambda _: (
            "D033" in (table := stack.table("monitors"))
            and json.loads(unpack_state(table["D033"]).state)["monitor"]["tiles_seen"] == len(ids)
        ),
        timeout_s=120,
    )
    assert not stack.read("deadletter")
