"""End-to-end on the real Kafka broker and MinIO server: two regions, one shifted.

No step depends on how fast a worker is: the test waits for the rollout event of the shifted region, and only
then streams the tiles that must be predicted by the new version.
"""

from __future__ import annotations

import pytest

from tests.stream.kafka.stack import prediction_keys

pytestmark = pytest.mark.services


def test_two_regions_one_shifted_end_to_end(make_stack, tiles):
    stack = make_stack()
    stack.start("worker", "worker")
    stack.start("adapt", "adapt-worker")
    first = stack.ingest(tiles["D033"], "D033") + stack.ingest(tiles["D013"][:30], "D013")  # detection + 16: a job

    # the event that matters: the shifted region's new version is promoted (registry alias moved) ...
    rollouts = stack.wait_for(
        "rollouts", lambda m: any(r["region"] == "D013" and r["step"] == "promoted" for r in m), timeout_s=300
    )
    assert [(r["region"], r["version"]) for r in rollouts if r["step"] == "promoted"] == [("D013", 1)]
    # ... and only then the rest of its stream arrives
    later = stack.ingest(tiles["D013"][30:], "D013")
    acqs = first + later
    ids = {a.id for a in acqs}
    assert len(ids) == 100

    preds = stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=300)

    # a prediction for every acquisition, and one prediction object per acquisition in MinIO
    assert {p["acquisition_id"] for p in preds} == ids
    keys = stack.predictions.list("")
    assert keys == prediction_keys(acqs)

    # drift only for the shifted region
    drift = stack.read("drift_events")
    assert drift, "the shifted region was not detected"
    assert {d["region"] for d in drift} == {"D013"}, drift
    assert "radiometry" in drift[0]["fired"]

    # exactly one new model version for it in MinIO, promoted; the other region still serves the source
    versions = stack.read("model_versions")
    assert [(v["region"], v["version"], v["accepted"]) for v in versions] == [("D013", 1, True)]
    assert [m.version for m in stack.registry.history("D013")] == [1]
    assert stack.registry.current("D013") == 1
    assert stack.registry.current("D033") == 0
    assert stack.registry.history("D033") == []

    # the tiles that arrived after the rollout were predicted with the new version, without a worker restart
    later_ids = {a.id for a in later}
    assert {p["model_version"] for p in preds if p["acquisition_id"] in later_ids} == {1}
    assert {p["model_version"] for p in preds if p["region"] == "D033"} == {0}
    assert not stack.read("deadletter")
