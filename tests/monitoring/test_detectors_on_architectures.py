"""The detector contract on every architecture's features: calibrated on one model's features of source tiles, each
detector stays quiet on more source tiles and fires on shifted ones (deep features are 16-d for the small U-Net,
512-d for the resnet18 encoders)."""

import numpy as np
import pytest
import torch

from monitoring.calibration import CalibrationData
from monitoring.features import TileFeatures
from monitoring.monitor import MonitorConfig, RegionMonitor, SignalDetector
from serving.predictor import predict_images
from terradapt.datasets.synthetic import SyntheticDataset
from tests.fakes.archs import ARCH_IDS, toy_model

#: detectors that test any feature vector (bn-distance and prediction are specialised to their signals)
VECTOR_DETECTORS = ("mean-shift", "kernel-mmd", "band-quantile")


@pytest.fixture(scope="module", params=ARCH_IDS)
def features(request) -> dict[str, list[TileFeatures]]:
    model = toy_model(request.param)
    data = SyntheticDataset({"D033": 104}, size=64, seed=4)
    images = [data.load("D033", t).image for t in data.tile_ids("D033")]
    shifted = [np.clip(im.astype(np.float32) * 0.6 + 50, 0, 255).astype(np.uint8) for im in images[80:]]

    def feats(ims):
        return [o.features for o in predict_images(model, ims, 0, torch.device("cpu"), 64, 16, 8)]

    return {"calibration": feats(images[:80]), "source": feats(images[80:]), "shifted": feats(shifted)}


def _first_alarm(monitor: RegionMonitor, stream: list[TileFeatures]) -> int | None:
    for i, f in enumerate(stream, start=1):
        if monitor.update(f).fired:
            return i
    return None


@pytest.mark.parametrize("detector", VECTOR_DETECTORS)
def test_each_detector_is_quiet_on_source_and_fires_on_a_shift(features, detector):
    data = CalibrationData.from_features(features["calibration"], seed=0)
    config = MonitorConfig(per_signal={"deep": SignalDetector(detector=detector)}, warmup_tiles=1)
    monitor = RegionMonitor.from_calibration(config, data)
    assert set(monitor.detectors) == {"radiometry", "deep", "batchnorm", "prediction"}
    assert _first_alarm(monitor.fresh(), features["source"]) is None
    deep_only = MonitorConfig(per_signal={"deep": SignalDetector(detector=detector)}, signals=("deep",))
    deep = RegionMonitor.from_calibration(deep_only, data)
    alarm = _first_alarm(deep, features["shifted"])
    assert alarm is not None and alarm <= 16, alarm
