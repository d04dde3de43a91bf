"""One-sided test of per-tile BatchNorm distances against the source (batchnorm signal)."""

from __future__ import annotations

import math

import numpy as np

from monitoring.detectors.base import Vector, normal_quantile
from monitoring.detectors.windowed import WindowedDetector, pit


class BatchNormDistanceDetector(WindowedDetector):
    """One-sided test that the BatchNorm distances of the window exceed the source's (batchnorm signal).

    Why: the per-tile BatchNorm statistics (distance of a tile's activation mean and log-variance to the
    running source statistics, see ``monitoring.features``) only *grow* under covariate shift, so a one-sided
    test spends its whole false-alarm budget on the side that matters. The distances are skewed and bounded
    below, so each is first mapped to a normal score through the source quantile sketch; the statistic is
    sqrt(window) times the window mean of the normal scores averaged over components, normal under the null
    (its spread, correlation between components included, is measured by cross-fitting).
    """

    name = "bn-distance"
    family = "normal"

    def _fit(self, x: Vector, rng: np.random.Generator) -> dict[str, Vector]:
        return {"sketch": np.quantile(x, np.linspace(0.0, 1.0, 65), axis=0), "n": np.array([float(x.shape[0])])}

    def _stats(self, ref: dict[str, Vector], windows: Vector) -> Vector:
        eps = 0.5 / float(ref["n"][0])
        u = np.clip(pit(windows, ref["sketch"]), eps, 1.0 - eps)
        z = np.vectorize(normal_quantile, otypes=[np.float64])(u)
        return np.asarray(math.sqrt(windows.shape[1]) * z.mean(axis=(1, 2)), dtype=np.float64)
