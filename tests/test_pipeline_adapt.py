"""The pipeline's adaptation step: per-region methods, BBSE estimate in the job, reset to source when a shift ends.

A tiny U-Net is trained for 100 steps on 64 px synthetic D033 tiles (about 10 s); the registry is a local folder.
"""

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from adapters.buffer import BufferedTile
from adapters.gate import GateConfig
from adapters.job import AdaptationConfig
from serving.predictor import InProcessPredictor
from serving.registry import ModelRegistry
from serving.rollout import InProcessDeployer
from serving.store import FileSystemStore
from stream.pipeline import CALIBRATION_KEY, Pipeline, calibrate_monitor
from terradapt.checkpoint import ModelManifest, encode
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.model import UNetConfig
from terradapt.records import AdaptationJob, DriftEvent
from terradapt.training import TrainConfig, train_source_checkpoint


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    ds = SyntheticDataset({"D033": 48, "D013": 16}, size=64, seed=0)
    src = [ds.load("D033", i) for i in ds.tile_ids("D033")]
    rng = np.random.default_rng(0)
    src = [src[i] for i in rng.permutation(len(src))]
    model, manifest = train_source_checkpoint(
        [s.image for s in src[:24]],
        [s.mask for s in src[:24]],
        UNetConfig(in_channels=5, num_classes=13, base_channels=8, depth=2),
        TrainConfig(steps=100, batch_size=8, crop=64, lr=1e-2, seed=0, device="cpu"),
        classes=ds.classes,
        bands=ds.band_names,
        regions=("D033",),
    )
    shifted = [ds.load("D013", i) for i in ds.tile_ids("D013")]
    return {"model": model, "manifest": manifest, "calibration": src[24:40], "source": src[40:], "shifted": shifted}


def _pipeline(tmp_path, data, adaptation=None):
    store = FileSystemStore(tmp_path / "models")
    registry = ModelRegistry(store)
    weights, manifest_json = encode(data["model"], data["manifest"])
    registry.publish_source(weights, ModelManifest.model_validate_json(manifest_json))
    predictor = InProcessPredictor(registry, device="cpu")
    pipeline = Pipeline(
        registry=registry,
        predictor=predictor,
        deployer=InProcessDeployer(registry),
        adaptation=adaptation or AdaptationConfig(device="cpu"),
    )
    cal = data["calibration"]
    state = calibrate_monitor(predictor, [s.image for s in cal], pipeline.monitor_config, masks=[s.mask for s in cal])
    store.put(CALIBRATION_KEY, json.dumps(state).encode())
    return pipeline


def _job(region, base, samples, method="bn", job_id="j"):
    tiles = [BufferedTile(f"{region}-{i}", s.image) for i, s in enumerate(samples)]
    trigger = DriftEvent(
        region=region,
        acquisition_id=tiles[-1].acquisition_id,
        tiles_seen=1,
        signal="x",
        score=1.0,
        threshold=0.5,
        covariate=True,
    )
    job = AdaptationJob(
        job_id=job_id,
        region=region,
        base_version=base,
        method=method,
        tile_ids=tuple(t.acquisition_id for t in tiles),
        trigger=trigger,
    )
    return job, tiles


def test_calibration_stores_the_source_confusion_matrix(tmp_path, data):
    pipeline = _pipeline(tmp_path, data)
    confusion = np.asarray(pipeline.calibration()["label_shift"]["confusion"])
    assert confusion.shape == (13, 13)
    labelled = sum(int((s.mask != 255).sum()) for s in data["calibration"])
    assert confusion.sum() == labelled


def test_job_gets_a_bbse_estimate_and_the_gate_uses_it(tmp_path, data):
    pipeline = _pipeline(tmp_path, data)
    job, tiles = _job("D013", 0, data["shifted"])
    adapted = pipeline.adapt(job, tiles)
    metrics = adapted.gate.metrics
    assert "tv_reference_to_prior" in metrics  # the estimate reached the gate
    manifest = pipeline.registry.load("D013", adapted.version.version)[1]
    assert manifest.method == "bn" and manifest.parent == 0


def test_per_region_method_overrides_the_default(tmp_path, data):
    cfg = AdaptationConfig(device="cpu", per_region={"D013": {"method": "tent", "method_config": {"lr": 1e-4}}})
    assert cfg.method_for("D013").method == "tent"
    assert cfg.method_for("D040").method == "bn"
    pipeline = _pipeline(tmp_path, data, cfg)
    job, tiles = _job("D013", 0, data["shifted"], method=cfg.method_for("D013").method)
    adapted = pipeline.adapt(job, tiles)
    assert pipeline.registry.load("D013", adapted.version.version)[1].method == "tent"
    with pytest.raises(ValidationError, match="accepted"):
        AdaptationConfig(per_region={"D013": {"method": "nope"}})


def test_adapted_region_whose_shift_ended_goes_back_to_the_source_weights(tmp_path, data):
    # the toy source model is weak: open the class-mix checks so the first adaptation is deployed (the reset path
    # is what this test is about; the gate has its own tests)
    gate = GateConfig(max_class_tv=1.0, min_agreement=0.0)
    pipeline = _pipeline(tmp_path, data, AdaptationConfig(device="cpu", gate=gate))
    first = pipeline.adapt(*_job("D013", 0, data["shifted"], job_id="shifted"))
    assert first.gate.accepted, first.gate.reasons
    pipeline.deploy(first.version)
    assert pipeline.registry.current("D013") == first.version.version
    # the region's new tiles look like the source again: the next version is the source model, not an adaptation
    back = pipeline.adapt(*_job("D013", first.version.version, data["source"], job_id="back"))
    model, manifest = pipeline.registry.load("D013", back.version.version)
    assert manifest.method == "source" and back.gate.metrics["reset_to_source"] == 1.0
    source = pipeline.registry.load("D013", 0)[0].state_dict()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    # while a shifted stream keeps its shift, a new job adapts again (no reset)
    again = pipeline.adapt(*_job("D013", first.version.version, data["shifted"], job_id="again"))
    assert pipeline.registry.load("D013", again.version.version)[1].method == "bn"


def test_too_few_tiles_for_a_test_window_never_reset(tmp_path, data):
    pipeline = _pipeline(tmp_path, data)
    outputs = pipeline.predictor.predict("D013", [s.image for s in data["source"][:3]], version=0)
    assert pipeline.shifted_from_source(outputs)  # 3 tiles < the 8-tile window: inconclusive, not "back to source"
    outputs = pipeline.predictor.predict("D013", [s.image for s in data["source"]], version=0)
    assert not pipeline.shifted_from_source(outputs)
