"""Per-region monitor: one calibrated detector per signal, combined, reporting which signal fired.

Signals: class-conditional radiometry (the same classes look different: *covariate* shift), deep features and
BatchNorm statistics (the network sees something different: either kind), predictions (class mix and confidence:
often *label* shift). Only the first is blind to the class mix, and that split is what decides whether to adapt:
re-estimating normalisation statistics under pure label shift pulls predictions back toward the source class mix
and costs mIoU (shared/FINDINGS.md), so an alarm without a radiometry signal is reported, not adapted on.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from monitoring import signal_bank as bank
from monitoring.calibration import CalibrationData, CalibrationError
from monitoring.detectors import Detector, create_detector
from monitoring.features import TileFeatures
from monitoring.signal_bank import SignalUpdate
from terradapt.settings import StrictModel

log = logging.getLogger(__name__)
Vector = npt.NDArray[np.float64]


def _radiometry(f: TileFeatures) -> Vector:
    return np.concatenate([f.residual_mean, f.residual_std])


def _deep(f: TileFeatures) -> Vector:
    return f.deep


def _batchnorm(f: TileFeatures) -> Vector:
    return np.array([f.bn_mean_shift, f.bn_var_ratio])


def _prediction(f: TileFeatures) -> Vector:
    return np.concatenate([f.class_shares, [f.mean_entropy, f.mean_confidence]])


#: signal name -> (feature extractor, whether it isolates covariate shift). Only class-conditional radiometry
#: is blind to the class mix; deep features, BatchNorm statistics and predictions move under label shift too.
SIGNALS: dict[str, tuple[Callable[[TileFeatures], Vector], bool]] = {
    "radiometry": (_radiometry, True),
    "deep": (_deep, False),
    "batchnorm": (_batchnorm, False),
    "prediction": (_prediction, False),
}
#: score/threshold of a covariate signal above which its evidence stands on its own (measured on the synthetic
#: departements: label shift leaked up to ~1.5x into radiometry, covariate shifts gave 4x to 60x)
STRONG_RATIO = 2.0
COVARIATE_SIGNALS = tuple(name for name, (_, covariate) in SIGNALS.items() if covariate)


class SignalDetector(StrictModel):
    """The detector of one signal when it differs from the monitor's default ``detector``."""

    detector: str
    config: dict[str, Any] = Field(default_factory=dict)


class MonitorConfig(StrictModel):
    """Config of the per-region monitor.

    ``detector``/``detector_config`` apply to every signal; ``per_signal`` overrides them for named signals
    (e.g. ``{"deep": {"detector": "kernel-mmd"}}``): each test suits a different feature (a kernel two-sample
    test for high-dimensional deep features, a one-sided test for BatchNorm distances).

    ``ert`` is the monitor's expected run time between false alarms, all signals together: each signal's
    detector runs at ``ert * len(signals)`` (Bonferroni). A detector config that names its own ``ert`` keeps it
    (that signal then has its own run time, and the monitor's overall one changes accordingly).
    """

    detector: str = "mean-shift"
    detector_config: dict[str, Any] = Field(default_factory=dict)
    per_signal: dict[str, SignalDetector] = Field(default_factory=dict)
    signals: tuple[str, ...] = tuple(SIGNALS)
    ert: int = Field(default=1000, ge=10, description="expected run time without any alarm, all signals")
    warmup_tiles: int = Field(default=8, ge=1, description="tiles that set a region's new normal after a rollout")

    @field_validator("per_signal")
    @classmethod
    def _known_signals(cls, v: dict[str, SignalDetector]) -> dict[str, SignalDetector]:
        unknown = sorted(set(v) - set(SIGNALS))
        if unknown:
            raise ValueError(f"per_signal: unknown signal(s) {unknown}; available: {sorted(SIGNALS)}")
        return v

    @field_validator("signals")
    @classmethod
    def _known_signal_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(SIGNALS))
        if unknown or not v:
            raise ValueError(f"signals: unknown or empty {list(v)}; available: {sorted(SIGNALS)}")
        return v

    def detector_for(self, signal: str) -> tuple[str, dict[str, Any]]:
        """(detector name, its config) of one signal, with the signal's share of ``ert`` unless it names its own."""
        spec = self.per_signal.get(signal)
        name, cfg = (spec.detector, spec.config) if spec else (self.detector, self.detector_config)
        return name, {"ert": self.ert * len(self.signals), **cfg}

    def window_for(self, signal: str) -> int:
        """The window (tiles) of one signal's detector."""
        name, cfg = self.detector_for(signal)
        return int(getattr(create_detector(name, cfg), "config").window)  # noqa: B009


@dataclass(frozen=True)
class MonitorUpdate(SignalUpdate):
    """What one tile did to the region's monitor."""

    @property
    def p_value(self) -> float:
        """The region's p-value at this tile: the smallest signal p-value, Bonferroni-corrected over signals."""
        if not self.p_values:
            return 1.0
        return min(1.0, min(self.p_values.values()) * len(self.p_values))

    @property
    def covariate_shift(self) -> bool:
        """Whether the evidence points at covariate shift (adaptation may help).

        A covariate signal must have fired *and* be either clearly over its threshold (``STRONG_RATIO``) or at
        least as strong (score/threshold) as the prediction signal: class-conditional radiometry is not perfectly
        blind to the class mix (misclassified pixels leak into it), so under a strong label shift it can just
        cross its threshold while the prediction signal is far stronger.
        """
        fired = [s for s in self.fired if s in COVARIATE_SIGNALS]
        if not fired:
            return False
        strongest = max(self.ratio(s) for s in fired)
        if strongest >= STRONG_RATIO:
            return True
        return "prediction" not in self.scores or strongest >= self.ratio("prediction")

    def ratio(self, signal: str) -> float:
        """Score / threshold of one signal (1.0 = at threshold)."""
        t = self.thresholds[signal]
        return self.scores[signal] / t if t > 0 else 0.0

    @property
    def max_ratio(self) -> float:
        """Largest score/threshold over signals (1.0 = at threshold)."""
        return max((self.scores[s] / self.thresholds[s] for s in self.scores if self.thresholds[s] > 0), default=0)


class RegionMonitor:
    """The combined monitor of one region.

    Built from the runtime config and calibrated from calibration *data* (``from_calibration``), so every
    setting of the config takes effect; the per-region stream state (``state_dict``) holds no config and no
    calibration. The expected run time is split evenly over signals (Bonferroni on the per-tile alarm rate), so
    the monitor as a whole keeps the configured ERT on source-like data.
    """

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.detectors: dict[str, Detector] = {}
        for s in self.config.signals:
            name, cfg = self.config.detector_for(s)
            self.detectors[s] = create_detector(name, cfg)
        #: signals left out by calibration, with the reason (e.g. no BatchNorm layers in the model)
        self.skipped: dict[str, str] = {}
        self.tiles_seen = 0
        self.detected_at: int | None = None
        self.model_version = 0
        self._warmup: list[TileFeatures] | None = None

    @classmethod
    def from_calibration(cls, config: MonitorConfig, data: CalibrationData) -> RegionMonitor:
        """A monitor of ``config`` calibrated on stored calibration data (the cross-fitting halves are shuffled).

        Raises:
            CalibrationError: the data has too few tiles for the configured windows (each half needs a window).

        """
        monitor = cls(config)
        widest = max(config.window_for(s) for s in config.signals)
        if data.tiles < 2 * widest:
            raise CalibrationError(
                f"{data.tiles} calibration tiles cannot calibrate windows of {widest} tiles: "
                f"need at least {2 * widest} (recommended: 150 or more)"
            )
        fit, held_out = data.halves()
        monitor.calibrate(fit, held_out, seed=data.seed)
        return monitor

    def calibrate(self, fit: Sequence[TileFeatures], held_out: Sequence[TileFeatures], seed: int = 0) -> None:
        """Calibrate every signal on source tiles (features computed by the source model).

        A model without BatchNorm layers (GroupNorm/LayerNorm) gives no BatchNorm-statistics signal: its features
        are exactly zero on every calibration tile, and the signal is skipped (``skipped`` says why) instead of
        being calibrated on a constant.
        """
        rng = np.random.default_rng(seed)
        if "batchnorm" in self.detectors and all(f.bn_mean_shift == 0.0 and f.bn_var_ratio == 0.0 for f in fit):
            del self.detectors["batchnorm"]
            self.skipped["batchnorm"] = "the model has no BatchNorm layers: no BatchNorm-statistics signal"
            log.info("signal batchnorm skipped: %s", self.skipped["batchnorm"])
        for name, det in self.detectors.items():
            extract = SIGNALS[name][0]
            det.calibrate(np.stack([extract(f) for f in fit]), np.stack([extract(f) for f in held_out]), rng)
        self.reset()

    def fresh(self) -> RegionMonitor:
        """A copy with the same calibration and an empty stream (a region seen for the first time)."""
        clone = copy.deepcopy(self)
        clone._warmup = None
        clone.model_version = 0
        clone.reset()
        return clone

    def update(self, features: TileFeatures, model_version: int = 0) -> MonitorUpdate:
        """Feed one tile predicted by ``model_version``; report scores and whether drift newly started.

        Features of a different model version than the last ones start a warm-up: deep features, BatchNorm
        statistics and predictions change with the model, so the first ``warmup_tiles`` tiles seen through a
        newly rolled-out version become the region's new normal (detectors re-centred, calibration kept) and
        raise no alarm. The same rule holds in every runner, so no message has to tell the monitor of a rollout.
        """
        self.tiles_seen += 1
        if model_version != self.model_version:
            self.model_version = model_version
            self._warmup = []
            bank.reset_all(self.detectors)
        if self._warmup is not None:
            self._warmup.append(features)
            if len(self._warmup) >= self.config.warmup_tiles:
                self.rebaseline(self._warmup)
                self._warmup = None
            return bank.quiet_update(self.detectors, MonitorUpdate)
        update = bank.feed(self.detectors, {n: SIGNALS[n][0](features) for n in self.detectors}, MonitorUpdate)
        if update.newly_detected:
            self.detected_at = self.tiles_seen
        return update

    @property
    def warming_up(self) -> bool:
        """Whether the monitor is collecting a new normal after a model change."""
        return self._warmup is not None

    @property
    def drift_detected(self) -> bool:
        """Whether any signal has fired."""
        return bank.any_drift(self.detectors)

    @property
    def tiles_since_detection(self) -> int:
        """Tiles seen since the current detection, the detecting tile included (0 without a detection)."""
        return 0 if self.detected_at is None else self.tiles_seen - self.detected_at + 1

    def rebaseline(self, features: Sequence[TileFeatures]) -> None:
        """After an adaptation: the region's recent tiles, seen by the new model, are the new normal."""
        bank.rebaseline(self.detectors, {n: np.stack([SIGNALS[n][0](f) for f in features]) for n in self.detectors})
        self.detected_at = None

    def reset(self) -> None:
        """Forget the stream, keep calibration."""
        bank.reset_all(self.detectors)
        self.tiles_seen = 0
        self.detected_at = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable stream state (what the faust table stores per region): no config, no calibration."""
        return {
            "tiles_seen": self.tiles_seen,
            "detected_at": self.detected_at,
            "model_version": self.model_version,
            "warmup": None if self._warmup is None else [f.to_dict() for f in self._warmup],
            "detectors": bank.bank_state(self.detectors),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a region's stream state on this (configured, calibrated) monitor.

        The runtime config wins: a signal whose stored state came from another detector (the config changed
        between restarts) starts a fresh window, with a warning, instead of misreading the old one.
        """
        self.tiles_seen = int(state["tiles_seen"])
        detected = state["detected_at"]
        self.detected_at = None if detected is None else int(detected)  # a wrong type fails here, not tiles later
        self.model_version = int(state.get("model_version", 0))
        warm = state.get("warmup")
        self._warmup = None if warm is None else [TileFeatures.from_dict(d) for d in warm]
        bank.load_bank_state(self.detectors, state.get("detectors", {}))
