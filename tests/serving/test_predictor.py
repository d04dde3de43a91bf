"""The in-process predictor and the drift features over every architecture of the contract set."""

import numpy as np
import pytest
import torch

from monitoring.calibration import CalibrationData
from monitoring.monitor import MonitorConfig, RegionMonitor
from serving.predictor import InProcessPredictor, predict_images
from serving.registry import ModelRegistry
from serving.store import FileSystemStore
from terradapt.checkpoint import ModelManifest, encode
from tests.fakes.archs import ARCH_IDS, groupnorm_model, toy_model


def _images(n, size, seed=0):
    return list(np.random.default_rng(seed).integers(0, 255, size=(n, 5, size, size), dtype=np.uint8))


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_registry_predictor_gives_maps_and_features_of_every_architecture(tmp_path, arch):
    model = toy_model(arch)
    model.set_class_band_mean(torch.rand(4, 5))
    registry = ModelRegistry(FileSystemStore(tmp_path / "reg"))
    weights, manifest_json = encode(model, ModelManifest(config={}, classes=tuple("abcd"), bands=tuple("rgbne")))
    registry.publish_source(weights, ModelManifest.model_validate_json(manifest_json))
    predictor = InProcessPredictor(registry, device="cpu", window=64, overlap=16)
    images = _images(3, 64) + _images(1, 100, seed=1)  # three batched tiles and one tiled in windows
    outs = predictor.predict("D033", images)
    assert [o.class_map.shape for o in outs] == [(64, 64)] * 3 + [(100, 100)]
    assert all(o.version == 0 for o in outs)
    for o in outs:
        f = o.features
        assert f.deep.shape == (model.feature_dim,) and np.isfinite(f.deep).all()
        assert f.class_shares.shape == (4,) and f.class_shares.sum() == pytest.approx(1.0)
        assert f.bn_mean_shift > 0 and f.bn_var_ratio > 0
    # the loaded version carries the manifest's class look: the radiometry residual uses it
    loaded = predictor.model("D033", 0)
    assert torch.equal(loaded.class_band_mean, model.class_band_mean)
    same = predict_images(model, images[:3], 0, torch.device("cpu"), 64, 16, 4)
    np.testing.assert_allclose(outs[0].features.residual_mean, same[0].features.residual_mean, rtol=1e-5)


def test_a_model_without_batchnorm_has_no_batchnorm_signal_and_the_monitor_says_so():
    model = groupnorm_model()
    outs = predict_images(model, _images(24, 32), 0, torch.device("cpu"), 64, 16, 4)
    assert all(o.features.bn_mean_shift == 0.0 and o.features.bn_var_ratio == 0.0 for o in outs)
    data = CalibrationData.from_features([o.features for o in outs], seed=0)
    cfg = MonitorConfig(detector_config={"window": 4}, warmup_tiles=1)
    monitor = RegionMonitor.from_calibration(cfg, data)
    assert "batchnorm" not in monitor.detectors
    assert "no BatchNorm layers" in monitor.skipped["batchnorm"]
    update = monitor.update(outs[0].features)
    assert set(update.scores) == {"radiometry", "deep", "prediction"}
