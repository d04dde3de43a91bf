"""Drift detectors behind one contract, and their registry.

A detector consumes one feature vector per tile (``update``), exposes a read-only ``score`` and
``drift_detected``, and keeps bounded state that survives restarts through ``state_dict``/``load_state_dict``
(the faust table of the stream worker stores exactly that dict).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import Field

from monitoring.windowed import (
    BandQuantileConfig,
    BandQuantileDetector,
    BatchNormDistanceDetector,
    KernelMMDConfig,
    KernelMMDDetector,
    PredictionConfig,
    PredictionDetector,
    WindowedConfig,
    WindowState,
)
from terradapt.errors import UnknownNameError
from terradapt.settings import StrictModel

Vector = npt.NDArray[np.float64]


def _chi2_quantile(p: float, k: int) -> float:
    """Quantile of the chi-square law with k degrees of freedom (Wilson-Hilferty; < 1% error for k >= 2)."""
    z = NormalDist().inv_cdf(p)
    a = 2.0 / (9.0 * k)
    return float(k * max(1.0 - a + z * math.sqrt(a), 0.0) ** 3)


@runtime_checkable
class Detector(Protocol):
    """The detector contract (river's ``DriftDetector`` shape, with calibration and serialisable state)."""

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
        """Calibrated decision threshold."""
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
        """Forget the stream (the calibration stays)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (calibration + stream window)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by ``state_dict``."""
        ...


class MeanShiftConfig(StrictModel):
    """Config of the windowed mean-shift test."""

    window: int = Field(default=8, ge=1, description="tiles per test window")
    ert: int = Field(default=1000, ge=10, description="expected run time without drift, in tiles")
    max_components: int = Field(default=6, ge=1, description="principal components kept after whitening")
    bootstrap: int = Field(default=40_000, ge=1000, description="source windows drawn to set the threshold")
    shrinkage: float = Field(default=0.1, ge=0.0, le=1.0, description="covariance shrinkage toward diagonal")


class MeanShiftDetector(WindowState):
    """Windowed Hotelling-style test of the mean of whitened features against the source reference.

    Why this shape: domain shift in aerial imagery moves feature *means* (gain, haze, season), and a window mean
    of ``w`` tiles cuts the per-tile noise by sqrt(w), so a shift of ~1 source standard deviation is found in
    about one window. The features are whitened with a shrunk source covariance (reduced to the top principal
    components, because correlated features such as class shares are rank-deficient), so the statistic
    ``w * ||mean z||^2 / k`` is ~1 on source data. Its threshold is the (1 - 1/ERT) quantile of chi2(k)/k,
    scaled by how much more spread the statistic shows on source windows scored against a reference fitted on
    other source tiles (see ``calibrate``), i.e. calibrated for the stated expected run time between false
    alarms.
    """

    name = "mean-shift"

    def __init__(self, config: MeanShiftConfig | None = None) -> None:
        self.config = config or MeanShiftConfig()
        self._mean: Vector = np.zeros(0)
        self._proj: Vector = np.zeros((0, 0))
        self._init_window(self.config.window)

    @property
    def calibrated(self) -> bool:
        """Whether ``calibrate`` (or a loaded state) set a reference."""
        return self._proj.size > 0

    def _whiten(self, x: Vector) -> Vector:
        return np.asarray((np.atleast_2d(x) - self._mean) @ self._proj, dtype=np.float64)

    def _window_stat(self, z: Vector) -> Vector:
        """Statistic of windows: z has shape (..., w, k)."""
        w, k = z.shape[-2], z.shape[-1]
        return np.asarray(w * np.square(z.mean(axis=-2)).sum(axis=-1) / k, dtype=np.float64)

    def _fit_reference(self, x: Vector) -> tuple[Vector, Vector]:
        """Mean and whitening projection (top principal components of the shrunk covariance) of ``x``."""
        mean = x.mean(axis=0)
        cov = np.atleast_2d(np.cov(x, rowvar=False)) if x.shape[0] > 1 else np.eye(x.shape[1])
        diag = np.diag(np.diag(cov)) + 1e-9 * np.eye(cov.shape[0])
        cov = (1 - self.config.shrinkage) * cov + self.config.shrinkage * diag
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1][: self.config.max_components]
        vals = np.maximum(vals[order], 1e-9 * max(vals.max(), 1e-12))
        return mean, np.ascontiguousarray(vecs[:, order] / np.sqrt(vals))

    def calibrate(self, fit: Vector, held_out: Vector, rng: np.random.Generator) -> None:
        """Fit the reference on all source tiles; set the threshold by cross-fitting.

        Each half of the tiles is scored against a reference fitted on the other half, which measures how far a
        fresh source window strays from an estimated reference (estimation error, heavy tails, sub-regional
        mixtures all included). The tail's *shape* comes from the chi-square law the statistic follows for
        independent Gaussian tiles (k * stat ~ chi2(k)); its *scale* is the largest ratio of empirical to
        chi-square quantiles at the median, 90% and 97.5% (quantiles a few dozen tiles estimate well), never
        below 1. The result is conservative: the final reference uses all tiles, so it is more accurate than the
        half-sample references that set the scale.
        """
        a = np.atleast_2d(np.asarray(fit, dtype=np.float64))
        b = np.atleast_2d(np.asarray(held_out, dtype=np.float64))
        stats = []
        for ref, other in ((a, b), (b, a)):
            self._mean, self._proj = self._fit_reference(ref)
            z = self._whiten(other)
            idx = rng.integers(0, z.shape[0], size=(self.config.bootstrap // 2, self.config.window))
            stats.append(self._window_stat(z[idx]))
        pooled = np.concatenate(stats)
        self._mean, self._proj = self._fit_reference(np.concatenate([a, b]))
        k = self._proj.shape[1]
        scale = max([1.0] + [float(np.quantile(pooled, q)) / (_chi2_quantile(q, k) / k) for q in (0.5, 0.9, 0.975)])
        self._threshold = scale * _chi2_quantile(1.0 - 1.0 / self.config.ert, k) / k
        self.reset()

    def rebaseline(self, vectors: Vector) -> None:
        """Re-centre the reference on ``vectors`` (the region's new normal after an adaptation)."""
        self._mean = np.atleast_2d(np.asarray(vectors, dtype=np.float64)).mean(axis=0)
        self.reset()

    def update(self, x: Vector) -> None:
        window = self._push(self._whiten(np.asarray(x, dtype=np.float64))[0])
        if window is not None:
            self._decide(float(self._window_stat(window)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config.model_dump(),
            "mean": self._mean.tolist(),
            "proj": self._proj.tolist(),
            **self._window_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = MeanShiftConfig.model_validate(state["config"])
        self._mean = np.asarray(state["mean"], dtype=np.float64)
        self._proj = np.asarray(state["proj"], dtype=np.float64)
        self._load_window_state(state, self.config.window)


def _mean_shift(config: dict[str, Any]) -> Detector:
    return MeanShiftDetector(MeanShiftConfig.model_validate(config))


def _band_quantile(config: dict[str, Any]) -> Detector:
    return BandQuantileDetector(BandQuantileConfig.model_validate(config))


def _kernel_mmd(config: dict[str, Any]) -> Detector:
    return KernelMMDDetector(KernelMMDConfig.model_validate(config))


def _bn_distance(config: dict[str, Any]) -> Detector:
    return BatchNormDistanceDetector(WindowedConfig.model_validate(config))


def _prediction(config: dict[str, Any]) -> Detector:
    return PredictionDetector(PredictionConfig.model_validate(config))


#: name -> factory taking the detector's own config dict; filled explicitly, never by import side effects.
_DETECTORS: dict[str, Callable[[dict[str, Any]], Detector]] = {
    MeanShiftDetector.name: _mean_shift,
    BandQuantileDetector.name: _band_quantile,
    KernelMMDDetector.name: _kernel_mmd,
    BatchNormDistanceDetector.name: _bn_distance,
    PredictionDetector.name: _prediction,
}


def available_detectors() -> list[str]:
    """Names of the registered detectors (feeds config validation and the CLI)."""
    return sorted(_DETECTORS)


def create_detector(name: str, config: dict[str, Any] | None = None) -> Detector:
    """Build a registered detector by name; unknown names list the valid ones."""
    try:
        factory = _DETECTORS[name]
    except KeyError:
        raise UnknownNameError("detector", name, available_detectors()) from None
    return factory(config or {})
