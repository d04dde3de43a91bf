"""Drift detectors behind one contract (``monitoring.detectors.base.Detector``), and their registry.

One file per detector; the windowed ones share their calibration (``monitoring.detectors.windowed``). The
registry is an explicit name -> factory mapping, filled here by explicit imports, never by import side effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monitoring.detectors.band_quantile import BandQuantileConfig, BandQuantileDetector
from monitoring.detectors.base import Detector, IncompatibleStateError, chi2_quantile, chi2_sf
from monitoring.detectors.bn_distance import BatchNormDistanceDetector
from monitoring.detectors.kernel_mmd import KernelMMDConfig, KernelMMDDetector
from monitoring.detectors.mean_shift import MeanShiftConfig, MeanShiftDetector
from monitoring.detectors.prediction import PredictionConfig, PredictionDetector
from monitoring.detectors.windowed import WindowedConfig
from terradapt.errors import UnknownNameError

__all__ = [
    "BandQuantileDetector",
    "BatchNormDistanceDetector",
    "Detector",
    "IncompatibleStateError",
    "KernelMMDDetector",
    "MeanShiftDetector",
    "PredictionDetector",
    "available_detectors",
    "chi2_quantile",
    "chi2_sf",
    "create_detector",
    "detector_config_type",
]

#: name -> (config model, factory taking the validated config)
_DETECTORS: dict[str, tuple[type[Any], Callable[[Any], Detector]]] = {
    MeanShiftDetector.name: (MeanShiftConfig, MeanShiftDetector),
    BandQuantileDetector.name: (BandQuantileConfig, BandQuantileDetector),
    KernelMMDDetector.name: (KernelMMDConfig, KernelMMDDetector),
    BatchNormDistanceDetector.name: (WindowedConfig, BatchNormDistanceDetector),
    PredictionDetector.name: (PredictionConfig, PredictionDetector),
}


def available_detectors() -> list[str]:
    """Names of the registered detectors (feeds config validation and the CLI)."""
    return sorted(_DETECTORS)


def detector_config_type(name: str) -> type[Any]:
    """The config model of a registered detector; unknown names list the valid ones."""
    try:
        return _DETECTORS[name][0]
    except KeyError:
        raise UnknownNameError("detector", name, available_detectors()) from None


def create_detector(name: str, config: dict[str, Any] | None = None) -> Detector:
    """Build a registered detector by name from its own config (unknown keys are errors)."""
    config_type = detector_config_type(name)
    return _DETECTORS[name][1](config_type.model_validate(config or {}))
