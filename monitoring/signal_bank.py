"""The part every per-region monitor shares: one calibrated detector per signal, fed and restored together.

``RegionMonitor`` (tiles) and ``SeriesMonitor`` (parcel time series) differ in where their signal vectors come
from and in what evidence counts as covariate shift; feeding the detectors, reporting which signal fired, the
warm-up re-baseline and the stream-state round trip are the same, and live here once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from monitoring.detectors import Detector, IncompatibleStateError

__all__ = [
    "SignalUpdate",
    "any_drift",
    "bank_state",
    "feed",
    "load_bank_state",
    "quiet_update",
    "rebaseline",
    "reset_all",
]

log = logging.getLogger(__name__)
Vector = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SignalUpdate:
    """What one item (tile, parcel) did to a region's monitor: every signal's score and threshold, what fired."""

    scores: dict[str, float]
    thresholds: dict[str, float]
    fired: tuple[str, ...]
    newly_detected: bool
    p_values: dict[str, float] = field(default_factory=dict)


U = TypeVar("U", bound=SignalUpdate)


def any_drift(detectors: Mapping[str, Detector]) -> bool:
    """Whether any signal has fired."""
    return any(d.drift_detected for d in detectors.values())


def feed(detectors: Mapping[str, Detector], vectors: Mapping[str, Vector], kind: type[U]) -> U:
    """Feed every signal's detector its vector; report as ``kind``, ``newly_detected`` if quiet before this item."""
    was = any_drift(detectors)
    for name, det in detectors.items():
        det.update(vectors[name])
    fired = tuple(n for n, d in detectors.items() if d.drift_detected)
    return kind(
        scores={n: d.score for n, d in detectors.items()},
        thresholds={n: d.threshold for n, d in detectors.items()},
        fired=fired,
        newly_detected=bool(fired) and not was,
        p_values={n: d.p_value for n, d in detectors.items()},
    )


def quiet_update(detectors: Mapping[str, Detector], kind: type[U]) -> U:
    """The report of an item seen during a warm-up: no score, no alarm."""
    return kind(
        scores={n: 0.0 for n in detectors},
        thresholds={n: d.threshold for n, d in detectors.items()},
        fired=(),
        newly_detected=False,
        p_values={n: 1.0 for n in detectors},
    )


def reset_all(detectors: Mapping[str, Detector]) -> None:
    """Forget every detector's stream, keep the calibration."""
    for det in detectors.values():
        det.reset()


def rebaseline(detectors: Mapping[str, Detector], normal: Mapping[str, Vector]) -> None:
    """Re-centre every detector on (N, d) vectors of the region's new normal (calibration kept)."""
    for name, det in detectors.items():
        det.rebaseline(normal[name])


def bank_state(detectors: Mapping[str, Detector]) -> dict[str, Any]:
    """Every detector's JSON-serialisable stream state, by signal."""
    return {n: d.state_dict() for n, d in detectors.items()}


def load_bank_state(detectors: Mapping[str, Detector], stored: Mapping[str, Any]) -> None:
    """Restore ``bank_state`` output; the runtime config wins.

    A signal whose stored state came from another detector (the config changed between restarts) starts a fresh
    window, with a warning, instead of misreading the old one; a signal without stored state keeps its own.
    """
    for name, det in detectors.items():
        try:
            if name in stored:
                det.load_state_dict(stored[name])
        except IncompatibleStateError as exc:
            log.warning("signal %s: stored stream state not reused (%s); starting a fresh window", name, exc)
            det.reset()
