"""The stream worker's message handler without a broker: retries with backoff, then dead-letters; nothing lost."""

import asyncio
import json

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from monitoring.metrics import ServiceMetrics
from serving.minio_store import HrefReader
from serving.predictor import InProcessPredictor
from serving.registry import ModelRegistry
from serving.rollout import InProcessDeployer
from serving.store import FileSystemStore
from stream.config import Settings
from stream.kafka.ingest import acquisition_for
from stream.kafka.services import Services
from stream.kafka.topics import Topics
from stream.kafka.worker import AcquisitionHandler
from stream.pipeline import CALIBRATION_KEY, Pipeline, calibrate_monitor
from terradapt.checkpoint import ModelManifest, encode
from terradapt.model import UNet, UNetConfig
from tests.fakes.flair_tiles import write_tile


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
def handler_factory(tmp_path):
    torch.manual_seed(0)
    store = FileSystemStore(tmp_path / "models")
    registry = ModelRegistry(store)
    w, m = encode(
        UNet(UNetConfig(base_channels=4, depth=2)),
        ModelManifest(config={}, classes=tuple("abcdefghijklm"), bands=("r", "g", "b", "n", "e")),
    )
    registry.publish_source(w, ModelManifest.model_validate_json(m))
    inner = InProcessPredictor(registry, device="cpu")
    settings = Settings(stream={"predict_retries": 2})
    calib = [np.random.default_rng(i).integers(0, 255, (5, 64, 64), dtype=np.uint8) for i in range(16)]
    store.put(CALIBRATION_KEY, json.dumps(calibrate_monitor(inner, calib, settings.monitor)).encode())

    def make(failures):
        predictor = FlakyPredictor(inner, failures)
        metrics = ServiceMetrics(CollectorRegistry())
        pipeline = Pipeline(
            registry=registry,
            predictor=predictor,
            deployer=InProcessDeployer(registry),
            predictions=FileSystemStore(tmp_path / "pred"),
            metrics=metrics,
        )
        services = Services(settings, pipeline, HrefReader(None), Topics.with_prefix("t."), metrics, {})

        async def run(fn):
            return fn()

        return AcquisitionHandler(services, run, {}, {}, {}), predictor, metrics

    return make


def _payload(tmp_path):
    path = write_tile(tmp_path / "tile.tif", size=64)
    data = path.read_bytes()
    return acquisition_for(data, "D033", path.resolve().as_uri()).to_json()


def test_transient_predictor_failure_is_retried(handler_factory, tmp_path):
    handler, predictor, _ = handler_factory(failures=2)
    out = asyncio.run(handler.handle(b"D033", _payload(tmp_path)))
    assert [o.topic for o in out] == ["predictions", "features"]
    assert predictor.calls == 3


def test_predictor_down_dead_letters_after_retries_and_keeps_payload(handler_factory, tmp_path):
    handler, predictor, metrics = handler_factory(failures=100)
    payload = _payload(tmp_path)
    out = asyncio.run(handler.handle(b"D033", payload))
    assert [o.topic for o in out] == ["deadletter"]
    letter = out[0].record
    assert letter.reason == "predictor_unavailable"
    assert letter.payload == payload.decode()
    assert predictor.calls == 3  # 1 try + 2 retries
    assert metrics.registry.get_sample_value("terradapt_dead_letters_total", {"reason": "predictor_unavailable"}) == 1
