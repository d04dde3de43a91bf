"""Class-mix and confidence test on the predictions (prediction signal)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from monitoring.detectors.base import Vector
from monitoring.detectors.windowed import WindowedConfig, WindowedDetector


class PredictionConfig(WindowedConfig):
    """Config of the prediction test."""

    confidence_dims: int = Field(default=2, ge=0, description="trailing components that are entropy/confidence")


class PredictionDetector(WindowedDetector):
    """Class-mix and confidence test on predictions: the larger of two normalised chi-square distances.

    Why two parts: a new class mix (label shift) moves the predicted class shares while confidence may stay,
    and a model that becomes unsure (covariate shift, new objects) loses confidence while the mix may stay.
    The class-mix part is a Pearson-style distance of the window's mean shares to the source's,
    ``w * sum_j (p_j - pi_j)^2 / var_j``; the confidence part is the same on the trailing ``confidence_dims``
    components (mean entropy, mean confidence). Each is divided by its null mean (measured on the reference) so
    neither dominates, and the maximum is calibrated as one statistic.
    """

    name = "prediction"
    config_type = PredictionConfig

    def _split(self, d: int) -> int:
        cfg = self.config if isinstance(self.config, PredictionConfig) else PredictionConfig()
        return max(d - cfg.confidence_dims, 0)

    def _fit(self, x: Vector, rng: np.random.Generator) -> dict[str, Vector]:
        mean, var = x.mean(axis=0), x.var(axis=0)
        var = np.where(var > 1e-12, var, 1e-12)
        return {"mean": mean, "var": var, "norm": self._parts(mean, var, x[:, None, :]).mean(axis=0)}

    def _parts(self, mean: Vector, var: Vector, windows: Vector) -> Vector:
        """(n, 2): class-mix and confidence distances of each window (a part with no components is 0)."""
        w = windows.shape[1]
        dist = w * np.square(windows.mean(axis=1) - mean) / var
        k = self._split(windows.shape[-1])
        mix = dist[:, :k].sum(axis=1) if k else np.zeros(dist.shape[0])
        conf = dist[:, k:].sum(axis=1) if k < dist.shape[1] else np.zeros(dist.shape[0])
        return np.stack([mix, conf], axis=1)

    def _stats(self, ref: dict[str, Vector], windows: Vector) -> Vector:
        parts = self._parts(ref["mean"], ref["var"], windows)
        norm = np.where(ref["norm"] > 0, ref["norm"], 1.0)
        return np.asarray((parts / norm).max(axis=1), dtype=np.float64)
