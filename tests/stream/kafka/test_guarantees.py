"""Guarantees on the real broker and MinIO: bad input is dead-lettered (worker keeps going), crashes lose nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from affine import Affine

from stream.kafka.ingest import acquisition_for
from terradapt.raster import Raster, raster_to_geotiff_bytes
from terradapt.records import AdaptationJob, DriftEvent
from tests.stream.kafka.stack import prediction_keys

pytestmark = pytest.mark.services

TRANSFORM = Affine(0.2, 0, 400000, 0, -0.2, 6400000)


def _tiff(bands: int = 5, dtype: str = "uint8", size: int = 64, crs: str | None = "EPSG:2154") -> bytes:
    data = np.random.default_rng(0).integers(0, 200, size=(bands, size, size)).astype(dtype)
    return raster_to_geotiff_bytes(Raster(data, crs, TRANSFORM))


def _put(stack, region: str, name: str, data: bytes) -> bytes:
    """Store an object and return the STAC payload announcing it."""
    href = stack.acquisitions.put(f"{region}/{name}.tif", data, "image/tiff")
    return acquisition_for(data, region, href).to_json()


def _bad_payloads(stack, tiles):
    good = tiles["D033"][0].read_bytes()
    return {
        "corrupt": ("corrupt_tile", _put(stack, "D033", "corrupt", b"II*\x00" + b"\x17" * 5000)),
        "truncated": ("corrupt_tile", _put(stack, "D033", "truncated", good[: len(good) // 2])),
        "band_count": ("invalid_tile", _put(stack, "D033", "bands", _tiff(bands=3))),
        "dtype": ("invalid_tile", _put(stack, "D033", "dtype", _tiff(dtype="float32"))),
        "missing_object": (
            "missing_object",
            acquisition_for(good, "D033", f"s3://{stack.settings.s3.bucket_acquisitions}/D033/nope.tif").to_json(),
        ),
        "malformed_json": ("malformed_payload", b'{"type": "Feature", "id": '),
        "unknown_region": ("unknown_region", _put(stack, "D099", "elsewhere", good)),
        "oversized": ("oversized_tile", _put(stack, "D033", "huge", _tiff(size=700))),
    }


@pytest.fixture(scope="module")
def dlq_stack(tmp_path_factory, source_checkpoint, tiles):
    from tests.stream.kafka.stack import Stack

    stack = Stack(
        tmp_path_factory.mktemp("dlq"),
        {"TERRADAPT_STREAM__REGIONS": '["D033", "D013"]', "TERRADAPT_STREAM__MAX_TILE_BYTES": "1000000"},
    )
    stack.publish_source(*source_checkpoint)
    stack.start("worker", "worker")
    try:
        yield stack, _bad_payloads(stack, tiles)
    finally:
        stack.stop_all()


CASES = [
    "corrupt",
    "truncated",
    "band_count",
    "dtype",
    "missing_object",
    "malformed_json",
    "unknown_region",
    "oversized",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_goes_to_deadletter_and_worker_keeps_going(dlq_stack, tiles, case):
    stack, payloads = dlq_stack
    reason, payload = payloads[case]
    stack.send_raw("D033", payload)
    # a good acquisition right behind it, on the same partition (same key), must still be predicted (a tile of its
    # own per case: its prediction can only come from after the bad message)
    good = stack.ingest([tiles["D033"][CASES.index(case) + 1]], "D033")[0]
    letters = stack.wait_for(
        "deadletter", lambda m: any(x["payload"] == payload.decode("utf-8", "replace") for x in m), timeout_s=90
    )
    letter = next(x for x in letters if x["payload"] == payload.decode("utf-8", "replace"))
    assert letter["reason"] == reason, letter
    assert letter["error"]
    stack.wait_for("predictions", lambda m: any(p["acquisition_id"] == good.id for p in m), timeout_s=90)
    assert stack.procs["worker"].poll() is None


def test_stream_worker_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(make_stack, tiles):
    stack = make_stack()
    stack.start("worker", "worker")
    stack.start("adapt", "adapt-worker")
    acqs = stack.ingest(tiles["D013"][:40], "D013") + stack.ingest(tiles["D033"][:20], "D033")
    ids = {a.id for a in acqs}
    stack.wait_for("predictions", lambda m: len(m) >= 15, timeout_s=180)
    stack.kill("worker")
    stack.start("worker", "worker")
    preds = stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=240)
    assert {p["acquisition_id"] for p in preds} == ids
    # at-least-once: replays may publish a prediction twice, but each acquisition has exactly one object
    keys = stack.predictions.list("")
    assert keys == prediction_keys(acqs)
    # no version registered twice: one adapted version for the shifted region, none elsewhere
    stack.wait_for("model_versions", lambda m: len(m) >= 1, timeout_s=120)
    history = stack.registry.history("D013")
    assert len(history) == 1
    assert len({m.job_id for m in history}) == 1
    assert stack.registry.history("D033") == []


def test_adapt_worker_sigkill_mid_job_registers_one_version(make_stack, tiles):
    # slow adaptation (many TENT passes) so the kill lands inside the job
    stack = make_stack({"TERRADAPT_ADAPTATION__METHOD": "tent", "TERRADAPT_ADAPTATION__EPOCHS": "60"})
    acqs = stack.ingest(tiles["D013"][:8], "D013")
    drift = DriftEvent(
        region="D013",
        acquisition_id=acqs[-1].id,
        tiles_seen=8,
        signal="radiometry",
        score=9.0,
        threshold=1.0,
        fired=("radiometry",),
        covariate=True,
    )
    job = AdaptationJob(
        job_id="adapt-kill-test",
        region="D013",
        base_version=0,
        method="tent",
        tile_ids=tuple(a.id for a in acqs),
        tile_hrefs=tuple(a.href for a in acqs),
        trigger=drift,
    )
    stack.producer.send(stack.topics.adaptation_jobs, key=b"D013", value=job.to_json()).get(timeout=30)
    stack.start("adapt", "adapt-worker")
    stack.wait_for_log("adapt", "adapting D013", timeout_s=120)  # the job has started (an event, not a delay)
    # 60 TENT passes make the kill land inside the job; wherever it lands (before the publish, between the publish
    # and the rollout, after both), the restarted worker must end with exactly one version, rolled out
    stack.kill("adapt")
    stack.start("adapt", "adapt-worker")
    versions = stack.wait_for("model_versions", lambda m: len(m) >= 1, timeout_s=240)
    assert {v["job_id"] for v in versions} == {"adapt-kill-test"} and {v["version"] for v in versions} == {1}
    history = stack.registry.history("D013")
    assert [(m.version, m.job_id) for m in history] == [(1, "adapt-kill-test")]
    # the same job delivered again (at-least-once) republishes the existing version, registers nothing new
    stack.producer.send(stack.topics.adaptation_jobs, key=b"D013", value=job.to_json()).get(timeout=30)
    before = len(versions)
    versions = stack.wait_for("model_versions", lambda m: len(m) > before, timeout_s=120)
    assert {v["version"] for v in versions} == {1}
    assert len(stack.registry.history("D013")) == 1
    assert json.loads(stack.models.get("aliases/D013.json"))["current"] == 1
