"""The default detector: a windowed Hotelling-style test of the mean of whitened features."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from monitoring.detectors.base import Vector, WindowState, chi2_quantile, chi2_sf
from terradapt.settings import StrictModel


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
        self._scale = 1.0
        self._init_window(self.config.window)

    @property
    def calibrated(self) -> bool:
        """Whether ``calibrate`` set a reference."""
        return self._proj.size > 0

    @property
    def p_value(self) -> float:
        """P-value of the current window: ``k * score / scale`` follows chi2(k) on source-like windows."""
        if not self.window_full or not self.calibrated:
            return 1.0
        k = self._proj.shape[1]
        return chi2_sf(k * self._score / self._scale, k)

    def _whiten(self, x: Vector) -> Vector:
        return np.asarray((np.atleast_2d(x) - self._mean - self._offset) @ self._proj, dtype=np.float64)

    @staticmethod
    def _window_stat(z: Vector) -> Vector:
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
        self._offset = np.zeros(a.shape[1])
        stats = []
        for ref, other in ((a, b), (b, a)):
            self._mean, self._proj = self._fit_reference(ref)
            z = self._whiten(other)
            idx = rng.integers(0, z.shape[0], size=(self.config.bootstrap // 2, self.config.window))
            stats.append(self._window_stat(z[idx]))
        pooled = np.concatenate(stats)
        self._mean, self._proj = self._fit_reference(np.concatenate([a, b]))
        k = self._proj.shape[1]
        self._scale = max(
            [1.0] + [float(np.quantile(pooled, q)) / (chi2_quantile(q, k) / k) for q in (0.5, 0.9, 0.975)]
        )
        self._threshold = self._scale * chi2_quantile(1.0 - 1.0 / self.config.ert, k) / k
        self._row_dim = k
        self.reset()

    def rebaseline(self, vectors: Vector) -> None:
        """Re-centre the reference on ``vectors`` (the region's new normal after an adaptation)."""
        self._offset = np.atleast_2d(np.asarray(vectors, dtype=np.float64)).mean(axis=0) - self._mean
        self.reset()

    def update(self, x: Vector) -> None:
        window = self._push(self._whiten(np.asarray(x, dtype=np.float64))[0])
        if window is not None:
            self._decide(float(self._window_stat(window)))
