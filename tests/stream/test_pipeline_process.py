"""``Pipeline.process``: one acquisition through every stage; typed errors become dead letters, nothing is lost.

These are the unit tests of what the faust acquisitions agent runs (the agent only moves the message and the
region's state bytes).
"""

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitoring.metrics import ServiceMetrics
from stream.observer import MetricsObserver
from stream.state import RegionState
from tests.fakes.world import make_rig, publish, settings


class FlakyPredictor:
    """Fails with ConnectionError ``failures`` times (TorchServe down), then predicts."""

    def __init__(self, inner, failures):
        self.inner, self.failures, self.calls = inner, failures, 0

    def predict(self, region, images, version=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("torchserve unreachable")
        return self.inner.predict(region, images, version)


@pytest.fixture
def rig(world, tmp_path):
    metrics = ServiceMetrics(CollectorRegistry())
    r = make_rig(world, tmp_path / "models", settings(stream={"predict_retries": 2}), MetricsObserver(metrics))
    r.pipeline.sleep = lambda _: None  # backoff without waiting
    r.metrics = metrics
    return r


def test_acquisition_gives_prediction_features_state_and_a_stored_cog(rig, world):
    payload = publish(rig.objects, "D033", 0, world.source[0].image)
    out = rig.pipeline.process(payload, "D033", None)
    assert [m.topic for m in out.messages] == ["predictions", "features"]
    prediction = out.records("predictions")[0]
    assert prediction.model_version == 0 and prediction.href == "memory://predictions/D033/D033-00000.tif"
    assert rig.predictions.exists("D033/D033-00000.tif")
    state = RegionState.from_bytes(out.state, rig.pipeline.new_monitor(), 16)
    assert state.monitor.tiles_seen == 1 and [t.acquisition_id for t in state.recent] == ["D033-00000"]


def test_transient_predictor_failure_is_retried(rig, world):
    flaky = rig.pipeline.predictor = FlakyPredictor(rig.pipeline.predictor, failures=2)
    out = rig.pipeline.process(publish(rig.objects, "D033", 0, world.source[0].image), "D033", None)
    assert [m.topic for m in out.messages] == ["predictions", "features"]
    assert flaky.calls == 3


def test_predictor_down_dead_letters_after_retries_and_keeps_payload(rig, world):
    flaky = rig.pipeline.predictor = FlakyPredictor(rig.pipeline.predictor, failures=100)
    payload = publish(rig.objects, "D033", 0, world.source[0].image)
    out = rig.pipeline.process(payload, "D033", b"untouched")
    assert [m.topic for m in out.messages] == ["deadletter"] and out.state is None  # the stored state stays
    letter = out.messages[0].record
    assert letter.reason == "predictor_unavailable" and letter.payload == payload.decode()
    assert letter.topic == "terradapt.acquisitions" and letter.stage == "predict"
    assert flaky.calls == 3  # 1 try + 2 retries
    sample = rig.metrics.registry.get_sample_value
    assert sample("terradapt_dead_letters_total", {"reason": "predictor_unavailable"}) == 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("malformed", "malformed_payload"),
        ("missing_object", "missing_object"),
        ("not_a_tiff", "corrupt_tile"),
        ("wrong_key", "key_mismatch"),
        ("bands", "invalid_tile"),
    ],
)
def test_bad_input_is_a_typed_dead_letter(rig, world, case, reason):
    good = publish(rig.objects, "D033", 1, world.source[0].image)
    key = "D033"
    if case == "malformed":
        payload = b'{"type": "Feature", "id": '
    elif case == "missing_object":
        rig.objects.delete("D033/D033-00001.tif")
        payload = good
    elif case == "not_a_tiff":
        rig.objects.put("D033/D033-00001.tif", b"II*\x00" + b"\x17" * 500)
        payload = good
    elif case == "wrong_key":
        payload, key = good, "D013"
    else:
        payload = publish(rig.objects, "D033", 1, world.source[0].image[:3])
    out = rig.pipeline.process(payload, key, None)
    assert [m.topic for m in out.messages] == ["deadletter"]
    assert out.messages[0].record.reason == reason
    assert out.messages[0].record.payload == payload.decode("utf-8", "replace")


def test_a_replayed_acquisition_is_predicted_again_but_counted_once(rig, world):
    """At-least-once delivery: a redelivered message must not move the monitor or the trigger twice."""
    state = None
    for i, s in enumerate(world.source[:5]):
        state = rig.pipeline.process(publish(rig.objects, "D033", i, s.image), "D033", state).state
    replay = rig.pipeline.process(publish(rig.objects, "D033", 4, world.source[4].image), "D033", state)
    assert [m.topic for m in replay.messages] == ["predictions", "features"]
    assert state is not None
    before = json.loads(state)
    after = json.loads(replay.state)
    assert after == before  # same monitor windows, counters and recent tiles


def test_unreadable_stored_state_starts_the_region_afresh(rig, world):
    out = rig.pipeline.process(publish(rig.objects, "D033", 0, world.source[0].image), "D033", b"not json")
    assert [m.topic for m in out.messages] == ["predictions", "features"]
    assert json.loads(out.state)["monitor"]["tiles_seen"] == 1


def test_unexpected_error_is_dead_lettered_not_raised(rig, world):
    class Broken:
        def predict(self, region, images, version=None):
            raise RuntimeError("bug")

    rig.pipeline.predictor = Broken()
    out = rig.pipeline.process(publish(rig.objects, "D033", 0, world.source[0].image), "D033", None)
    assert out.messages[0].record.reason == "internal_error" and "bug" in out.messages[0].record.error
    assert np.isfinite(
        rig.metrics.registry.get_sample_value("terradapt_dead_letters_total", {"reason": "internal_error"})
    )
