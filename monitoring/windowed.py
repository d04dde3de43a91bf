"""Windowed two-sample drift tests with one shared calibration: band quantiles, kernel MMD, BatchNorm, prediction.

Every detector here compares the last ``window`` tiles of a region with a bounded summary of the source (a
quantile sketch, a fixed subsample, or moments) and keeps the ``Detector`` contract of ``monitoring.detectors``.
They differ in the statistic only; the calibration is shared (``WindowedDetector.calibrate``):

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
from collections import deque
from statistics import NormalDist
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from terradapt.settings import StrictModel

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
        return self.loc + self.scale * _NORMAL.inv_cdf(p)

    def p_value(self, stat: float) -> float:
        """P(stat' >= stat) under the fitted, inflated null."""
        x = (stat - self.loc) / (self.scale * self.inflation)
        if self.family == "chi2":
            return chi2_sf(x, self.df)
        return 1.0 - _NORMAL.cdf(x)

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


def _pit(x: Vector, sketch: Vector) -> Vector:
    """Probability-integral transform of x (..., d) through per-dimension quantile sketches (q, d)."""
    levels = np.linspace(0.0, 1.0, sketch.shape[0])
    out = np.empty_like(x)
    for j in range(x.shape[-1]):
        out[..., j] = np.interp(x[..., j], sketch[:, j], levels)
    return out


class WindowState:
    """The stream side every windowed detector shares: the last ``window`` vectors, latest score, latch, count.

    Bounded by construction (a ``deque(maxlen=window)``); serialised under the same keys by every detector.
    """

    _threshold: float
    _window: deque[list[float]]
    _score: float
    _detected: bool
    _seen: int

    def _init_window(self, size: int) -> None:
        self._threshold = float("inf")
        self._window = deque(maxlen=size)
        self._score = 0.0
        self._detected = False
        self._seen = 0

    @property
    def drift_detected(self) -> bool:
        return self._detected

    @property
    def score(self) -> float:
        return self._score

    @property
    def threshold(self) -> float:
        return self._threshold

    def _push(self, row: Vector) -> Vector | None:
        """Append one tile's vector; the full window (w, d) once there are ``window`` tiles, else None."""
        self._seen += 1
        self._window.append(np.asarray(row, dtype=np.float64).ravel().tolist())
        if len(self._window) < (self._window.maxlen or 0):
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

    def _window_state(self) -> dict[str, Any]:
        return {
            "threshold": self._threshold,
            "window": list(self._window),
            "score": self._score,
            "detected": self._detected,
            "seen": self._seen,
        }

    def _load_window_state(self, state: dict[str, Any], size: int) -> None:
        self._threshold = float(state["threshold"])
        self._window = deque((list(map(float, v)) for v in state["window"]), maxlen=size)
        self._score = float(state["score"])
        self._detected = bool(state["detected"])
        self._seen = int(state["seen"])


class WindowedDetector(WindowState, ABC):
    """Shared machinery: window, offset (re-baseline), cross-fitted calibration, state.

    Subclasses define ``_fit`` (the bounded source summary, a dict of arrays) and ``_stats`` (the statistic of a
    batch of windows, vectorised so calibration scores thousands of windows at once).
    """

    name: ClassVar[str]
    family: ClassVar[Literal["chi2", "normal"]] = "chi2"
    config_type: ClassVar[type[WindowedConfig]] = WindowedConfig

    def __init__(self, config: WindowedConfig | None = None) -> None:
        self.config = config or self.config_type()
        self._ref: dict[str, Vector] = {}
        self._offset: Vector = np.zeros(0)
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

        One window's p-value, not adjusted for looking at every tile: feed it to ``monitoring.fdr`` per look.
        """
        return 1.0 if len(self._window) < self.config.window else self._tail.p_value(self._score)

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config.model_dump(),
            "ref": {k: v.tolist() for k, v in self._ref.items()},
            "offset": self._offset.tolist(),
            "tail": self._tail.model_dump(),
            **self._window_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = self.config_type.model_validate(state["config"])
        self._ref = {k: np.asarray(v, dtype=np.float64) for k, v in state["ref"].items()}
        self._offset = np.asarray(state["offset"], dtype=np.float64)
        self._tail = Tail.model_validate(state["tail"])
        self._load_window_state(state, self.config.window)


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
        u = np.sort(_pit(windows, ref["sketch"]), axis=1)
        w = windows.shape[1]
        expected = (2.0 * np.arange(1, w + 1) - 1.0) / (2.0 * w)
        cvm = np.square(u - expected[None, :, None]).sum(axis=1) + 1.0 / (12.0 * w)
        return np.asarray(cvm.mean(axis=-1), dtype=np.float64)


class KernelMMDConfig(WindowedConfig):
    """Config of the windowed kernel MMD test."""

    reference_size: int = Field(default=128, ge=8, le=4096, description="source tiles kept as the reference")
    bandwidth: float | None = Field(default=None, gt=0.0, description="Gaussian kernel width; None = median")


class KernelMMDDetector(WindowedDetector):
    """Windowed maximum mean discrepancy (Gaussian kernel) between the last tiles and a fixed source subsample.

    Why: deep features move in many directions at once and not always in the mean (a new texture can widen a
    cluster); an MMD with a characteristic kernel sees any change of distribution. Online and bounded: a fixed
    subsample of ``reference_size`` standardised source vectors and a ring buffer of ``window`` tiles, so one
    update costs O(window x reference_size x d). The biased (V-statistic) MMD^2 is used: it is non-negative,
    a quadratic form whose null law a scaled chi-square fits well.
    """

    name = "kernel-mmd"
    config_type = KernelMMDConfig

    def _fit(self, x: Vector, rng: np.random.Generator) -> dict[str, Vector]:
        cfg = self.config if isinstance(self.config, KernelMMDConfig) else KernelMMDConfig()
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 1e-9, std, 1.0)
        idx = rng.choice(x.shape[0], size=min(cfg.reference_size, x.shape[0]), replace=False)
        r = (x[idx] - mean) / std
        d2 = np.square(r[:, None, :] - r[None, :, :]).sum(axis=-1)
        if cfg.bandwidth is not None:
            gamma = 1.0 / (2.0 * cfg.bandwidth**2)
        else:
            off = d2[np.triu_indices(r.shape[0], 1)]
            med = float(np.median(off)) if off.size else 1.0
            gamma = 1.0 / max(med, 1e-12)
        krr = float(np.exp(-gamma * d2).mean())
        return {"mean": mean, "std": std, "ref": r, "gamma": np.array([gamma]), "krr": np.array([krr])}

    def _stats(self, ref: dict[str, Vector], windows: Vector) -> Vector:
        gamma = float(ref["gamma"][0])
        z = (windows - ref["mean"]) / ref["std"]
        r = ref["ref"]
        zz = np.square(z).sum(axis=-1)
        d_wr = zz[..., None] + np.square(r).sum(axis=-1)[None, None, :] - 2.0 * (z @ r.T)
        d_ww = zz[..., None] + zz[:, None, :] - 2.0 * np.einsum("nid,njd->nij", z, z)
        k_wr = np.exp(-gamma * np.maximum(d_wr, 0.0)).mean(axis=(1, 2))
        k_ww = np.exp(-gamma * np.maximum(d_ww, 0.0)).mean(axis=(1, 2))
        return np.asarray(k_ww + float(ref["krr"][0]) - 2.0 * k_wr, dtype=np.float64)


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
        u = np.clip(_pit(windows, ref["sketch"]), eps, 1.0 - eps)
        z = np.vectorize(_NORMAL.inv_cdf, otypes=[np.float64])(u)
        return np.asarray(math.sqrt(windows.shape[1]) * z.mean(axis=(1, 2)), dtype=np.float64)


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
