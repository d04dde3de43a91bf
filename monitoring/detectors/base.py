"""The detector contract, the stream state every windowed test shares, and the chi-square law they calibrate with.

A detector consumes one feature vector per tile (``update``), exposes a read-only ``score``, ``threshold``,
``p_value`` and ``drift_detected``, and splits what it knows in two:

* its *calibration* (source reference and null law), rebuilt with ``calibrate`` from the calibration *data*
  stored beside the source model and the detector's *runtime* config (window, ERT...). It is never serialised
  with the stream state, so a setting changed at start always takes effect;
* its *stream state* (``state_dict``/``load_state_dict``): the last ``window`` vectors, latest score, latch,
  tiles seen and the re-baseline offset of a region. That is what the faust table stores per region: small,
  bounded, and meaningful only on top of a calibration.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import NormalDist
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float64]
_NORMAL = NormalDist()


def chi2_quantile(p: float, k: float) -> float:
    """Quantile of the chi-square law with (real) ``k`` degrees of freedom, Wilson-Hilferty approximation.

    Conservative (slightly too large) in the far tail for k < 2, accurate to ~1% above.
    """
    z = _NORMAL.inv_cdf(p)
    a = 2.0 / (9.0 * k)
    return float(k * max(1.0 - a + z * math.sqrt(a), 0.0) ** 3)


def chi2_sf(x: float, k: float) -> float:
    """Survival function of the chi-square law (inverse of ``chi2_quantile``)."""
    if x <= 0.0:
        return 1.0
    a = 2.0 / (9.0 * k)
    z = ((x / k) ** (1.0 / 3.0) - (1.0 - a)) / math.sqrt(a)
    return 1.0 - _NORMAL.cdf(z)


def normal_sf(z: float) -> float:
    """Survival function of the standard normal law."""
    return 1.0 - _NORMAL.cdf(z)


def normal_quantile(p: float) -> float:
    """Quantile of the standard normal law."""
    return _NORMAL.inv_cdf(p)


class IncompatibleStateError(ValueError):
    """A stored stream state does not fit this detector (another detector, or vectors of another size)."""


@runtime_checkable
class Detector(Protocol):
    """The detector contract (river's ``DriftDetector`` shape, with calibration and serialisable stream state)."""

    @property
    def drift_detected(self) -> bool:
        """Whether the calibrated test has fired (latched until ``reset``)."""
        ...

    @property
    def score(self) -> float:
        """Current test statistic (comparable with ``threshold``)."""
        ...

    @property
    def threshold(self) -> float:
        """Calibrated decision threshold (inf until calibrated)."""
        ...

    @property
    def p_value(self) -> float:
        """P-value of the current window under the calibrated null (1.0 until the first full window)."""
        ...

    def calibrate(self, fit: Vector, held_out: Vector, rng: np.random.Generator) -> None:
        """Fit the source reference on ``fit`` and set the threshold from ``held_out`` source vectors."""
        ...

    def rebaseline(self, vectors: Vector) -> None:
        """Accept ``vectors`` as the stream's new normal (after an adaptation), keeping the calibration."""
        ...

    def update(self, x: Vector) -> None:
        """Consume one tile's feature vector."""
        ...

    def reset(self) -> None:
        """Forget the stream (the calibration and the re-baseline offset stay)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable stream state (never the calibration)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a stream state produced by ``state_dict`` on a detector of the same name and dimension."""
        ...


class WindowState:
    """The stream side every detector shares: last ``window`` vectors, score, latch, count, re-baseline offset.

    Bounded by construction (a ``deque(maxlen=window)``); serialised under the same keys by every detector. The
    offset is the translation of the source reference that ``rebaseline`` applied (zero on the source model).
    """

    name: ClassVar[str]
    _threshold: float
    _window: deque[list[float]]
    _score: float
    _detected: bool
    _seen: int
    _offset: Vector
    _row_dim: int

    def _init_window(self, size: int) -> None:
        self._threshold = float("inf")
        self._window = deque(maxlen=size)
        self._score = 0.0
        self._detected = False
        self._seen = 0
        self._offset = np.zeros(0)
        self._row_dim = 0  # entries per window row, set by calibrate (0 = not calibrated yet)

    @property
    def drift_detected(self) -> bool:
        return self._detected

    @property
    def score(self) -> float:
        return self._score

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def window_full(self) -> bool:
        """Whether the window holds ``window`` tiles (a score exists)."""
        return len(self._window) == (self._window.maxlen or 0)

    def _push(self, row: Vector) -> Vector | None:
        """Append one tile's vector; the full window (w, d) once there are ``window`` tiles, else None."""
        self._seen += 1
        self._window.append(np.asarray(row, dtype=np.float64).ravel().tolist())
        if not self.window_full:
            return None
        return np.asarray(self._window, dtype=np.float64)

    def _decide(self, score: float) -> None:
        """Record the window's statistic; the alarm latches until ``reset``."""
        self._score = score
        if score > self._threshold:
            self._detected = True

    def reset(self) -> None:
        self._window.clear()
        self._score = 0.0
        self._detected = False
        self._seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "window": list(self._window),
            "score": self._score,
            "detected": self._detected,
            "seen": self._seen,
            "offset": self._offset.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise IncompatibleStateError(f"stream state of detector {state.get('name')!r}, this is {self.name!r}")
        offset = np.asarray(state.get("offset", []), dtype=np.float64)
        rows = [list(map(float, v)) for v in state["window"]]
        if self._row_dim and (
            (offset.size and offset.size != self._offset.size) or any(len(r) != self._row_dim for r in rows)
        ):
            raise IncompatibleStateError(f"stream state of {self.name!r} has vectors of another dimension")
        self._window = deque(rows, maxlen=self._window.maxlen)
        self._score = float(state["score"])
        self._detected = bool(state["detected"])
        self._seen = int(state["seen"])
        if offset.size:
            self._offset = offset
