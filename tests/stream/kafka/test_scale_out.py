"""Scale-out on the real broker: two stream workers in one consumer group, two adaptation workers in theirs.

A second stream worker joins mid-stream: the group rebalances and regions (message keys) move with their partitions
and their stored state (changelog-backed tables). Every worker logs each step it runs with its wall-clock span and
regions; the test reads both logs and checks that no region was ever in a step of both workers at overlapping times,
that nothing was lost and that the decisions and final states equal the one-process reference (``test_faults``).
The adaptation workers form their own group, sized on its own: the job is handled once, by one of them.
Every wait is on an event (a log line, a message), never on which process is faster.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from tests.stream.kafka.stack import Stack
from tests.stream.kafka.test_faults import (
    ENV,
    PROCESSED,
    READY,
    _assert_nothing_lost,
    _ingest,
    plan,  # noqa: F401  # the reference fixture, shared with the fault tests
)

pytestmark = pytest.mark.services

STEP = re.compile(r"step of \d+ acquisitions \[([^\]]*)\] from ([0-9.]+) to ([0-9.]+)")
JOB = "handled adaptation job of"

Span = tuple[float, float]


def _spans(stack: Stack, worker: str) -> dict[str, list[Span]]:
    """Region -> the (start, end) wall-clock spans of the steps of ``worker`` that included it."""
    out: dict[str, list[Span]] = defaultdict(list)
    for regions, start, end in STEP.findall(stack.log_text(worker)):
        for region in filter(None, regions.split(",")):
            out[region].append((float(start), float(end)))
    return out


def _overlaps(a: dict[str, list[Span]], b: dict[str, list[Span]]) -> list[tuple[str, Span, Span]]:
    """Steps of two workers on the same region whose spans intersect."""
    return [
        (region, x, y)
        for region in a.keys() & b.keys()
        for x in a[region]
        for y in b[region]
        if x[0] < y[1] and y[0] < x[1]
    ]


def test_two_stream_workers_share_regions_exclusively_and_adapt_workers_scale_apart(make_stack, plan):  # noqa: F811
    stack = make_stack(ENV)
    stack.start("adapt-1", "adapt-worker")
    stack.start("adapt-2", "adapt-worker")
    stack.start("worker-a", "worker")
    stack.wait_for_log("worker-a", READY, timeout_s=180)
    acqs = _ingest(stack, plan.half(0))
    stack.wait_for_log_count("worker-a", PROCESSED, 4, timeout_s=240)  # mid-stream: worker-a holds every region
    stack.start("worker-b", "worker")  # joins the group: the partitions (and the regions' states) are split
    stack.wait_for_log("worker-b", READY, timeout_s=180)
    acqs += _ingest(stack, plan.half(1))
    _assert_nothing_lost(stack, plan, acqs)  # one prediction each, decisions and states as the reference

    a, b = _spans(stack, "worker-a"), _spans(stack, "worker-b")
    assert b, "worker-b never processed a region: the group did not share the partitions"
    assert not _overlaps(a, b), _overlaps(a, b)
    steps = sum(len(s) for s in a.values()) + sum(len(s) for s in b.values())
    assert steps >= len(plan.stream), (a, b)

    jobs = [stack.count_log(w, JOB) for w in ("adapt-1", "adapt-2")]
    assert sum(jobs) == len(plan.expected.jobs), jobs  # each job handled once, by one worker of the adapt group
