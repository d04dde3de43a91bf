"""Per-region monitor of parcel time series: one calibrated detector per series signal, as ``RegionMonitor`` does.

The signals are those of :mod:`monitoring.series_features` (one vector per parcel): ``profile`` (NDVI against the
source calendar: a season that runs earlier or later), ``radiometry`` (season band means: a sensor gain) and
``prediction`` (class probabilities and entropy: what the model makes of the parcels, label shift included). The
first two are model-free, so they are the *covariate* signals: only they make an alarm worth adapting on
(``SeriesUpdate.covariate_shift``); an alarm of the prediction signal alone is reported, not adapted on.

Why not ``monitoring.monitor.RegionMonitor`` itself: its signals are read from a tile's ``TileFeatures``
(radiometry residuals, deep features, BatchNorm statistics); a parcel has none of these. The rules are the same:
detectors from the registry (``monitoring.detectors``), the expected run time split over signals (Bonferroni),
calibration on held-out source parcels computed with the source model, and after a model change a warm-up whose
parcels become the region's new normal (detectors re-baselined, calibration kept); the detector bank itself is
:mod:`monitoring.signal_bank`, shared with ``RegionMonitor``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from monitoring import signal_bank as bank
from monitoring.calibration import CalibrationError
from monitoring.detectors import Detector, create_detector
from monitoring.signal_bank import SignalUpdate
from terradapt.settings import StrictModel

__all__ = ["SERIES_COVARIATE_SIGNALS", "SERIES_SIGNALS", "SeriesMonitor", "SeriesMonitorConfig", "SeriesUpdate"]

Array = npt.NDArray[np.float64]

#: every series signal, and the model-free (covariate) ones
SERIES_SIGNALS: tuple[str, ...] = ("profile", "radiometry", "prediction")
SERIES_COVARIATE_SIGNALS: tuple[str, ...] = ("profile", "radiometry")


class SeriesMonitorConfig(StrictModel):
    """Config of the per-region series monitor (units are parcels, not tiles).

    ``ert`` is the expected number of parcels between false alarms, all signals together; each signal's detector
    runs at ``ert * len(signals)`` unless ``detector_config`` names its own.
    """

    detector: str = "mean-shift"
    detector_config: dict[str, Any] = Field(default_factory=lambda: {"window": 16})
    signals: tuple[str, ...] = SERIES_SIGNALS
    ert: int = Field(default=20_000, ge=10, description="parcels between false alarms without drift, all signals")
    warmup_parcels: int = Field(default=32, ge=1, description="parcels that set a region's new normal after a change")

    @field_validator("signals")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(SERIES_SIGNALS))
        if unknown or not v:
            raise ValueError(f"signals: unknown or empty {list(v)}; available: {list(SERIES_SIGNALS)}")
        return v

    def detector_for(self) -> tuple[str, dict[str, Any]]:
        """(detector name, its config) of every signal, with the signal's share of ``ert``."""
        return self.detector, {"ert": self.ert * len(self.signals), **self.detector_config}

    @property
    def window(self) -> int:
        """The detectors' window (parcels)."""
        name, cfg = self.detector_for()
        return int(getattr(create_detector(name, cfg), "config").window)  # noqa: B009


@dataclass(frozen=True)
class SeriesUpdate(SignalUpdate):
    """What one parcel did to the region's monitor."""

    @property
    def covariate_shift(self) -> bool:
        """Whether a model-free signal (profile, radiometry) fired: the parcels themselves changed."""
        return any(s in SERIES_COVARIATE_SIGNALS for s in self.fired)

    @property
    def max_ratio(self) -> float:
        """Largest score / threshold over signals (1.0 = at threshold)."""
        ratios = [self.scores[s] / t for s, t in self.thresholds.items() if t > 0 and np.isfinite(t)]
        return max(ratios, default=0.0)

    @property
    def p_value(self) -> float:
        """The region's p-value at this parcel: the smallest signal p-value, Bonferroni-corrected over signals."""
        if not self.p_values:
            return 1.0
        return min(1.0, min(self.p_values.values()) * len(self.p_values))


class SeriesMonitor:
    """The combined series monitor of one region: ``calibrate`` once, then ``update`` per parcel."""

    def __init__(self, config: SeriesMonitorConfig | None = None) -> None:
        self.config = config or SeriesMonitorConfig()
        name, cfg = self.config.detector_for()
        self.detectors: dict[str, Detector] = {s: create_detector(name, cfg) for s in self.config.signals}
        self.parcels_seen = 0
        self.detected_at: int | None = None
        self.model_version = 0
        self._warmup: list[Mapping[str, Array]] | None = None

    def calibrate(self, fit: Mapping[str, Array], held_out: Mapping[str, Array], seed: int = 0) -> None:
        """Calibrate every signal on (N, d) vectors of held-out source parcels (two disjoint halves).

        Raises:
            CalibrationError: a signal is missing, or a half has fewer parcels than a window.

        """
        window = self.config.window
        rng = np.random.default_rng(seed)
        for name, det in self.detectors.items():
            if name not in fit or name not in held_out:
                raise CalibrationError(f"calibration has no {name!r} vectors (signals: {sorted(fit)})")
            if min(len(fit[name]), len(held_out[name])) < window:
                raise CalibrationError(
                    f"{len(fit[name])} + {len(held_out[name])} calibration parcels cannot calibrate windows of "
                    f"{window} parcels: each half needs at least {window}"
                )
            det.calibrate(np.asarray(fit[name], np.float64), np.asarray(held_out[name], np.float64), rng)
        self.reset()

    def fresh(self) -> SeriesMonitor:
        """A copy with the same calibration and an empty stream (a region seen for the first time)."""
        clone = copy.deepcopy(self)
        clone.model_version = 0
        clone.reset()
        return clone

    def update(self, vectors: Mapping[str, Array], model_version: int = 0) -> SeriesUpdate:
        """Feed one parcel (signal -> (d,) vector) predicted by ``model_version``.

        A parcel of another model version than the last starts a warm-up: the next ``warmup_parcels`` parcels
        become the new normal (the prediction signal changes with the model; after an adaptation, the profile
        and radiometry of the region are what the new version was adapted to) and raise no alarm.
        """
        self.parcels_seen += 1
        if model_version != self.model_version:
            self.model_version = model_version
            self._warmup = []
            bank.reset_all(self.detectors)
        if self._warmup is not None:
            self._warmup.append({k: np.asarray(v, np.float64) for k, v in vectors.items()})
            if len(self._warmup) >= self.config.warmup_parcels:
                bank.rebaseline(self.detectors, {n: np.stack([w[n] for w in self._warmup]) for n in self.detectors})
                self._warmup = None
                self.detected_at = None
            return bank.quiet_update(self.detectors, SeriesUpdate)
        update = bank.feed(
            self.detectors, {n: np.asarray(vectors[n], np.float64) for n in self.detectors}, SeriesUpdate
        )
        if update.newly_detected:
            self.detected_at = self.parcels_seen
        return update

    @property
    def drift_detected(self) -> bool:
        """Whether any signal has fired."""
        return bank.any_drift(self.detectors)

    @property
    def warming_up(self) -> bool:
        """Whether the monitor is collecting a new normal after a model change."""
        return self._warmup is not None

    def reset(self) -> None:
        """Forget the stream, keep the calibration."""
        bank.reset_all(self.detectors)
        self.parcels_seen = 0
        self.detected_at = None
        self._warmup = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable stream state (no config, no calibration)."""
        return {
            "parcels_seen": self.parcels_seen,
            "detected_at": self.detected_at,
            "model_version": self.model_version,
            "warmup": None if self._warmup is None else [{k: v.tolist() for k, v in w.items()} for w in self._warmup],
            "detectors": bank.bank_state(self.detectors),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output on this (configured, calibrated) monitor."""
        self.parcels_seen = int(state["parcels_seen"])
        self.detected_at = None if state["detected_at"] is None else int(state["detected_at"])
        self.model_version = int(state["model_version"])
        warm = state["warmup"]
        self._warmup = None if warm is None else [{k: np.asarray(v) for k, v in w.items()} for w in warm]
        bank.load_bank_state(self.detectors, state["detectors"])
