"""End-to-end on the real Kafka broker and MinIO server: two regions, one shifted."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.services


def test_two_regions_one_shifted_end_to_end(make_stack, tiles):
    stack = make_stack()
    stack.start("worker", "worker")
    stack.start("adapt", "adapt-worker")
    acqs = stack.ingest(tiles["D033"], "D033") + stack.ingest(tiles["D013"], "D013")
    ids = {a.id for a in acqs}
    assert len(ids) == 100

    preds = stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=240)

    # a prediction for every acquisition, and one prediction object per acquisition in MinIO
    assert {p["acquisition_id"] for p in preds} == ids
    keys = stack.predictions.list("")
    assert sorted(keys) == sorted(f"{a.region}/{a.id}.tif" for a in acqs)

    # drift only for the shifted region
    drift = stack.read("drift_events")
    assert drift, "the shifted region was not detected"
    assert {d["region"] for d in drift} == {"D013"}, drift
    assert "radiometry" in drift[0]["fired"]

    # exactly one new model version for it in MinIO, promoted; the other region still serves the source
    versions = stack.wait_for("model_versions", lambda m: len(m) >= 1)
    history = stack.registry.history("D013")
    assert [m.version for m in history] == [1]
    assert versions[0]["region"] == "D013" and versions[0]["accepted"]
    assert stack.registry.current("D013") == 1
    assert stack.registry.current("D033") == 0
    assert stack.registry.history("D033") == []

    # later predictions for D013 were made with the new version, without restarting the worker
    d013 = [p for p in preds if p["region"] == "D013"]
    assert d013[-1]["model_version"] == 1
    assert {p["model_version"] for p in preds if p["region"] == "D033"} == {0}
    assert not stack.read("deadletter")
