"""Per-band quantile-sketch (Cramer-von Mises) test: the shape of the radiometry, not only its mean."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from monitoring.detectors.base import Vector
from monitoring.detectors.windowed import WindowedConfig, WindowedDetector, pit


class BandQuantileConfig(WindowedConfig):
    """Config of the per-band quantile-sketch test."""

    quantiles: int = Field(default=65, ge=5, le=1025, description="stored source quantiles per band")


class BandQuantileDetector(WindowedDetector):
    """Per-band Cramer-von Mises test of the window against stored source quantiles (radiometry).

    Why: gain, haze and season change the *shape* of a band's distribution (spread, skew), not only its mean,
    and a mean test misses a contrast loss that keeps the mean. Each band's window values go through the source
    CDF (a ``quantiles``-point sketch, linear between points); on source data they are uniform, and the
    Cramer-von Mises distance of their empirical CDF to the uniform one, averaged over bands, is the statistic.
    Memory: ``quantiles x bands`` floats, independent of the number of calibration tiles.
    """

    name = "band-quantile"
    config_type = BandQuantileConfig

    def _fit(self, x: Vector, rng: np.random.Generator) -> dict[str, Vector]:
        cfg = self.config
        q = cfg.quantiles if isinstance(cfg, BandQuantileConfig) else 65
        return {"sketch": np.quantile(x, np.linspace(0.0, 1.0, q), axis=0)}

    def _stats(self, ref: dict[str, Vector], windows: Vector) -> Vector:
        u = np.sort(pit(windows, ref["sketch"]), axis=1)
        w = windows.shape[1]
        expected = (2.0 * np.arange(1, w + 1) - 1.0) / (2.0 * w)
        cvm = np.square(u - expected[None, :, None]).sum(axis=1) + 1.0 / (12.0 * w)
        return np.asarray(cvm.mean(axis=-1), dtype=np.float64)
