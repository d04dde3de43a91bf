"""The calibration every windowed two-sample test shares (band quantiles, kernel MMD, BatchNorm, prediction).

Every detector built on ``WindowedDetector`` compares the last ``window`` tiles of a region with a bounded summary
of the source (a quantile sketch, a fixed subsample, or moments). They differ in the statistic only; the
calibration is shared (``WindowedDetector.calibrate``):

1. *Cross-fitting*: a reference is fitted on one half of the source tiles and windows are bootstrapped from the
   other half (and the other way round), so the null statistics include the reference's estimation error.
2. *Tail model*: a closed-form law is moment-matched to those null statistics (a scaled chi-square for the
   quadratic statistics, Welch-Satterthwaite; a normal law for the one-sided mean), and its
   ``1 - 1/ERT`` quantile is the threshold: the per-tile alarm probability on source-like windows is ~1/ERT.
   Overlapping windows make exceedances cluster, so the mean time between alarms is at least about ERT.
3. *Tail check*: the threshold is scaled up by the largest ratio of empirical to model quantiles at 90/99/99.5%
   (never down), so a heavier tail than the model's does not slip through.

Memory is bounded by construction: the window is a ``deque(maxlen=window)`` and the source summary has a fixed
size set by the config, whatever the stream's length.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from monitoring.detectors.base import Vector, WindowState, chi2_quantile, chi2_sf, normal_quantile, normal_sf
from terradapt.settings import StrictModel


class WindowedConfig(StrictModel):
    """Fields every windowed test shares (the names match ``MeanShiftConfig`` so monitor configs carry over)."""

    window: int = Field(default=8, ge=2, description="tiles per test window")
    ert: int = Field(default=1000, ge=10, description="expected run time without drift, in tiles")
    bootstrap: int = Field(default=4000, ge=400, description="source windows drawn to fit the null tail")


class Tail(StrictModel):
    """The fitted null law of a window statistic: ``loc + scale * chi2(df)`` or ``loc + scale * N(0, 1)``."""

    family: Literal["chi2", "normal"]
    loc: float = 0.0
    scale: float = 1.0
    df: float = 1.0
    inflation: float = Field(default=1.0, ge=1.0, description="tail-check factor on (quantile - loc)")

    def quantile(self, p: float) -> float:
        """Model quantile (before inflation)."""
        if self.family == "chi2":
            return self.loc + self.scale * chi2_quantile(p, self.df)
        return self.loc + self.scale * normal_quantile(p)

    def p_value(self, stat: float) -> float:
        """P(stat' >= stat) under the fitted, inflated null."""
        x = (stat - self.loc) / (self.scale * self.inflation)
        if self.family == "chi2":
            return chi2_sf(x, self.df)
        return normal_sf(x)

    def threshold(self, ert: int) -> float:
        """The (1 - 1/ERT) quantile with the inflation applied."""
        return self.loc + self.inflation * (self.quantile(1.0 - 1.0 / ert) - self.loc)


def fit_tail(stats: Vector, family: Literal["chi2", "normal"]) -> Tail:
    """Moment-match ``family`` to null statistics and set the inflation from empirical quantiles."""
    m, v = float(np.mean(stats)), float(np.var(stats))
    if v <= 1e-24:  # a degenerate (constant) null: anything above it is an alarm
        return Tail(family="normal", loc=m, scale=max(abs(m), 1.0) * 1e-6)
    if family == "chi2" and m > 0:
        tail = Tail(family="chi2", scale=v / (2.0 * m), df=max(2.0 * m * m / v, 0.1))
    else:
        tail = Tail(family="normal", loc=m, scale=math.sqrt(v))
    ratios = [1.0]
    for q in (0.9, 0.99, 0.995):
        if stats.size * (1.0 - q) < 10:  # fewer than 10 exceedances: the empirical quantile is too noisy
            continue
        model = tail.quantile(q) - tail.loc
        if model > 0:
            ratios.append((float(np.quantile(stats, q)) - tail.loc) / model)
    return tail.model_copy(update={"inflation": max(ratios)})


def pit(x: Vector, sketch: Vector) -> Vector:
    """Probability-integral transform of x (..., d) through per-dimension quantile sketches (q, d)."""
    levels = np.linspace(0.0, 1.0, sketch.shape[0])
    out = np.empty_like(x)
    for j in range(x.shape[-1]):
        out[..., j] = np.interp(x[..., j], sketch[:, j], levels)
    return out


class WindowedDetector(WindowState, ABC):
    """Shared machinery: window, offset (re-baseline), cross-fitted calibration.

    Subclasses define ``_fit`` (the bounded source summary, a dict of arrays) and ``_stats`` (the statistic of a
    batch of windows, vectorised so calibration scores thousands of windows at once).
    """

    name: ClassVar[str]
    family: ClassVar[Literal["chi2", "normal"]] = "chi2"
    config_type: ClassVar[type[WindowedConfig]] = WindowedConfig

    def __init__(self, config: WindowedConfig | None = None) -> None:
        self.config = config or self.config_type()
        self._ref: dict[str, Vector] = {}
        self._tail = Tail(family=self.family)
        self._init_window(self.config.window)

    @abstractmethod
    def _fit(self, x: Vector, rng: np.random.Generator) -> dict[str, Vector]:
        """Bounded summary of source vectors ``x`` (n, d)."""

    @abstractmethod
    def _stats(self, ref: dict[str, Vector], windows: Vector) -> Vector:
        """Statistic of each window in ``windows`` (n, w, d) against ``ref``; large = drift."""

    @property
    def p_value(self) -> float:
        """P-value of the current window under the fitted null (1.0 until the first full window).

        One window's p-value, not adjusted for looking at every tile: ``monitoring.fdr`` combines them per look.
        """
        return self._tail.p_value(self._score) if self.window_full else 1.0

    def calibrate(self, fit: Vector, held_out: Vector, rng: np.random.Generator) -> None:
        """Cross-fit the null statistics on source tiles, fit their tail, keep a reference on all tiles."""
        a = np.atleast_2d(np.asarray(fit, dtype=np.float64))
        b = np.atleast_2d(np.asarray(held_out, dtype=np.float64))
        stats = []
        for ref_x, other in ((a, b), (b, a)):
            ref = self._fit(ref_x, rng)
            idx = rng.integers(0, other.shape[0], size=(self.config.bootstrap // 2, self.config.window))
            stats.append(self._stats(ref, other[idx]))
        self._tail = fit_tail(np.concatenate(stats), self.family)
        self._threshold = self._tail.threshold(self.config.ert)
        self._ref = self._fit(np.concatenate([a, b]), rng)
        self._ref["source_mean"] = np.concatenate([a, b]).mean(axis=0)
        self._offset = np.zeros(a.shape[1])
        self._row_dim = a.shape[1]
        self.reset()

    def rebaseline(self, vectors: Vector) -> None:
        """Shift the reference to the mean of ``vectors`` (the new normal), keeping its shape and calibration.

        A handful of warm-up tiles cannot re-estimate a distribution, only its location, so the source summary
        is translated rather than refitted.
        """
        mean = np.atleast_2d(np.asarray(vectors, dtype=np.float64)).mean(axis=0)
        self._offset = mean - self._ref["source_mean"]
        self.reset()

    def update(self, x: Vector) -> None:
        window = self._push(x)
        if window is not None:
            self._decide(float(self._stats(self._ref, (window - self._offset)[None])[0]))
