"""The adapt-or-reset policy: per-region methods and configs, BBSE estimate in the gate, back to source.

A tiny U-Net is trained for 100 steps on 64 px synthetic D033 tiles (about 10 s); calibration data comes from the
same bootstrap the registry uses.
"""

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydantic import ValidationError

from adapters.buffer import BufferedTile
from adapters.config import AdaptationConfig
from adapters.gate import GateConfig
from adapters.policy import adapt_or_reset, shifted_from_source, source_features
from monitoring.monitor import MonitorConfig, RegionMonitor
from serving.predictor import InProcessPredictor
from serving.registry import ModelRegistry
from serving.store import FileSystemStore
from stream.bootstrap import bootstrap_registry
from terradapt.checkpoint import ModelManifest, encode
from terradapt.datasets.base import Sample
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.model import UNetConfig
from terradapt.records import AdaptationJob, DriftEvent
from terradapt.training import TrainConfig, train_source_checkpoint


def _masks(samples: list[Sample]) -> list[npt.NDArray[np.uint8]]:
    """The label masks of labelled samples (the synthetic set labels every tile)."""
    masks = []
    for s in samples:
        assert s.mask is not None
        masks.append(s.mask)
    return masks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    ds = SyntheticDataset({"D033": 64, "D013": 16}, size=64, seed=0)
    src = [ds.load("D033", i) for i in ds.tile_ids("D033")]
    rng = np.random.default_rng(0)
    src = [src[i] for i in rng.permutation(len(src))]
    model, manifest = train_source_checkpoint(
        [s.image for s in src[:24]],
        _masks(src[:24]),
        UNetConfig(in_channels=5, num_classes=13, base_channels=8, depth=2),
        TrainConfig(steps=100, batch_size=8, crop=64, lr=1e-2, seed=0, device="cpu"),
        classes=ds.classes,
        bands=ds.band_names,
        regions=("D033",),
        tile_ids=[f"D033/{s.tile_id}" for s in src[:24]],
    )
    registry = ModelRegistry(FileSystemStore(tmp_path_factory.mktemp("models")))
    weights, manifest_json = encode(model, manifest)
    cal = src[24:56]
    _, calibration = bootstrap_registry(
        registry,
        weights,
        ModelManifest.model_validate_json(manifest_json),
        [s.image for s in cal],
        tile_ids=[f"D033/{s.tile_id}" for s in cal],
        masks=_masks(cal),
        device="cpu",
    )
    source, source_manifest = registry.load("source", 0)
    shifted = [ds.load("D013", i) for i in ds.tile_ids("D013")]
    return {
        "registry": registry,
        "model": source,
        "manifest": source_manifest,
        "calibration": calibration,
        "cal_tiles": cal,
        "source": src[56:],
        "shifted": shifted,
    }


def _monitor(data):
    return lambda: RegionMonitor.from_calibration(MonitorConfig(), data["calibration"])


def _job(region, base, samples, job_id="j") -> tuple[AdaptationJob, list[BufferedTile]]:
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
        method="bn",
        tile_ids=tuple(t.acquisition_id for t in tiles),
        trigger=trigger,
    )
    return job, tiles


def _adapt(data, job, tiles, config=None, current=None):
    return adapt_or_reset(
        job,
        tiles,
        data["model"],
        data["manifest"],
        config or AdaptationConfig(device="cpu"),
        new_monitor=_monitor(data),
        confusion=data["calibration"].confusion_matrix(),
        current=current,
    )


def test_calibration_stores_the_source_confusion_matrix_and_refuses_training_tiles(data):
    confusion = data["calibration"].confusion_matrix()
    assert confusion.shape == (13, 13)
    labelled = sum(int((s.mask != 255).sum()) for s in data["cal_tiles"])
    assert confusion.sum() == labelled
    assert data["calibration"].model_sha256 == data["manifest"].sha256
    overlapping = data["calibration"].model_copy(update={"tile_ids": data["manifest"].training_tiles[:2]})
    with pytest.raises(ValueError, match="used to train the source model"):
        data["registry"].publish_calibration(overlapping)


def test_job_gets_a_bbse_estimate_and_the_gate_uses_it(data):
    outcome = _adapt(data, *_job("D013", 0, data["shifted"]))
    assert outcome.context.label_shift is not None and len(outcome.context.label_shift) == 13
    assert "tv_reference_to_prior" in outcome.gate.metrics  # the estimate reached the gate
    assert outcome.manifest.method == "bn-balanced" and outcome.manifest.parent == 0  # the default method


def test_per_region_method_and_its_config_take_effect(data):
    still = AdaptationConfig.model_validate(
        {"device": "cpu", "per_region": {"D013": {"method": "tent", "method_config": {"lr": 1e-12}}}}
    )
    moving = AdaptationConfig.model_validate(
        {"device": "cpu", "per_region": {"D013": {"method": "tent", "method_config": {"lr": 1e-2}}}}
    )
    assert still.method_for("D013").method == "tent" and still.method_for("D040").method == "bn-balanced"
    job, tiles = _job("D013", 0, data["shifted"])
    slow, fast = _adapt(data, job, tiles, still), _adapt(data, job, tiles, moving)
    assert slow.manifest.method == fast.manifest.method == "tent"
    source = data["model"].state_dict()

    def moved(m):
        return max(
            float((v.float() - source[k].float()).abs().max()) for k, v in m.state_dict().items() if "weight" in k
        )

    assert moved(fast.model) > 100 * max(moved(slow.model), 1e-9)  # the region's lr reached the optimiser
    with pytest.raises(ValidationError, match="accepted"):
        AdaptationConfig.model_validate({"per_region": {"D013": {"method": "nope"}}})
    with pytest.raises(ValidationError, match="lrr"):
        AdaptationConfig.model_validate({"per_region": {"D013": {"method": "tent", "method_config": {"lrr": 1.0}}}})


def test_adapted_region_whose_shift_ended_goes_back_to_the_source_weights(data):
    # the toy source model is weak: open the class-mix checks so the first adaptation passes (the reset path is
    # what this test is about; the gate has its own tests)
    cfg = AdaptationConfig(device="cpu", gate=GateConfig(max_class_tv=1.0, min_agreement=0.0))
    first = _adapt(data, *_job("D013", 0, data["shifted"], job_id="shifted"), cfg)
    assert first.gate.accepted, first.gate.reasons
    back = _adapt(data, *_job("D013", 1, data["source"], job_id="back"), cfg, current=first.model)
    assert back.manifest.method == "source" and back.gate.metrics["reset_to_source"] == 1.0
    source = data["model"].state_dict()
    assert all(torch.equal(v, source[k]) for k, v in back.model.state_dict().items())
    # while a shifted stream keeps its shift, a new job adapts again (no reset)
    again = _adapt(data, *_job("D013", 1, data["shifted"], job_id="again"), cfg, current=first.model)
    assert again.manifest.method == "bn-balanced"


def test_too_few_tiles_for_a_test_window_never_reset(data):
    few = source_features(data["model"], [BufferedTile("x", s.image) for s in data["source"][:3]], "cpu")
    assert shifted_from_source(few, _monitor(data)())  # 3 tiles < the 8-tile window: inconclusive
    many = source_features(data["model"], [BufferedTile("x", s.image) for s in data["source"]], "cpu")
    assert not shifted_from_source(many, _monitor(data)())


def test_features_match_the_in_process_predictor(data):
    """The policy's own forward pass sees what the stream's predictor saw (same features, same model)."""
    tiles = [BufferedTile("x", s.image) for s in data["shifted"][:4]]
    mine = source_features(data["model"], tiles, "cpu")
    theirs = InProcessPredictor(data["registry"], device="cpu").predict("D013", [t.image for t in tiles], version=0)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a.deep, b.features.deep, rtol=1e-5, atol=1e-6)
