"""Label-shift estimation: the class proportions of a region from the source model's predictions.

Under label shift (p_t(x | y) = p_s(x | y), only p(y) changes) the predictions of a fixed source model carry
the target class proportions, blurred by the model's confusions. Two estimators:

* ``BBSE`` (black-box shift estimation, Lipton et al. 2018): the expected predicted shares are
  ``mu = M q`` where ``M[i, j] = P(pred = i | true = j)`` is measured on held-out *labelled source* tiles;
  solving for q (ridge-regularised toward the source prior, projected onto the simplex) needs only the region's
  predicted class shares, which every tile's features already carry.
* ``mlls`` (maximum-likelihood label shift, Saerens et al. 2002 EM): re-weights the source model's soft
  predictions by q / p_source until the mean posterior equals q; more accurate when the model's probabilities
  are calibrated, needs per-pixel (or per-tile) soft predictions.

The estimate feeds ``AdaptationJob.label_shift``: the gate's reference class mix for the region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import Field

from terradapt.settings import StrictModel

Vector = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LabelShiftEstimate:
    """Estimated target class proportions and the importance weights q / p_source."""

    proportions: Vector
    weights: Vector
    method: str
    iterations: int = 0

    def as_tuple(self) -> tuple[float, ...]:
        """The proportions as ``AdaptationJob.label_shift`` takes them."""
        return tuple(float(v) for v in self.proportions)


def project_simplex(v: Vector) -> Vector:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, v.size + 1)
    rho = int(np.nonzero(u - css / ind > 0)[0][-1])
    return np.asarray(np.maximum(v - css[rho] / (rho + 1.0), 0.0), dtype=np.float64)


def total_variation(p: Vector, q: Vector) -> float:
    """Total-variation distance between two class distributions."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


class BBSEConfig(StrictModel):
    """Config of BBSE."""

    ridge: float = Field(default=1e-3, ge=0.0, description="shrinkage toward the source prior (Tikhonov)")
    smoothing: float = Field(default=1.0, ge=0.0, description="pseudo-count added to each confusion cell")


class BBSE:
    """Black-box shift estimation from a source confusion matrix.

    Why the regularisation: with few labelled source tiles or rare classes, the confusion matrix is close to
    singular and a plain inverse amplifies sampling noise into negative or huge proportions. A pseudo-count per
    cell, a ridge penalty toward the source prior, and a projection onto the simplex keep the estimate a
    distribution that falls back to the source prior where the data says nothing.
    """

    def __init__(self, confusion: Vector, config: BBSEConfig | None = None) -> None:
        """Build from ``confusion[i, j]`` = pixel (or tile) counts of prediction i for true class j.

        Raises:
            ValueError: when ``confusion`` is not a square matrix of non-negative counts.

        """
        c = np.asarray(confusion, dtype=np.float64)
        if c.ndim != 2 or c.shape[0] != c.shape[1] or (c < 0).any():
            raise ValueError(f"confusion must be a square non-negative (k, k) matrix, got shape {c.shape}")
        self.config = config or BBSEConfig()
        c = c + self.config.smoothing
        self.source_prior: Vector = c.sum(axis=0) / c.sum()
        self.conditional: Vector = c / c.sum(axis=0, keepdims=True)  # M[i, j] = P(pred i | true j)

    @classmethod
    def from_labels(
        cls, y_true: npt.NDArray[np.integer], y_pred: npt.NDArray[np.integer], k: int, config: BBSEConfig | None = None
    ) -> BBSE:
        """Confusion counts from labelled held-out source pixels (any shape, flattened)."""
        idx = np.asarray(y_pred).ravel() * k + np.asarray(y_true).ravel()
        return cls(np.bincount(idx, minlength=k * k).reshape(k, k).astype(np.float64), config)

    def estimate(self, predicted_shares: Vector) -> LabelShiftEstimate:
        """Target proportions from the region's mean predicted class shares (hard predictions)."""
        mu = np.asarray(predicted_shares, dtype=np.float64)
        mu = mu / max(mu.sum(), 1e-12)
        m, p = self.conditional, self.source_prior
        lam = self.config.ridge
        q = np.linalg.solve(m.T @ m + lam * np.eye(m.shape[1]), m.T @ mu + lam * p)
        q = project_simplex(q)
        return LabelShiftEstimate(q, q / p, "bbse")


class MLLSConfig(StrictModel):
    """Config of the EM estimator."""

    max_iter: int = Field(default=500, ge=1)
    tol: float = Field(default=1e-8, gt=0.0, description="stop when proportions move less (L1)")


def mlls(probs: Vector, source_prior: Vector, config: MLLSConfig | None = None) -> LabelShiftEstimate:
    """Maximum-likelihood target proportions by EM on the source model's soft predictions.

    Args:
        probs: (n, k) source-model posteriors on the region's pixels or tiles.
        source_prior: (k,) class proportions of the source training data.
        config: iteration limits.

    Returns:
        The estimate; ``iterations`` is how many EM steps ran.

    """
    cfg = config or MLLSConfig()
    p = np.asarray(probs, dtype=np.float64)
    prior = np.asarray(source_prior, dtype=np.float64)
    prior = np.maximum(prior / prior.sum(), 1e-12)
    q = prior.copy()
    iterations, moved = 0, float("inf")
    while iterations < cfg.max_iter and moved >= cfg.tol:
        post = p * (q / prior)
        post /= np.maximum(post.sum(axis=1, keepdims=True), 1e-300)
        new = post.mean(axis=0)
        moved = float(np.abs(new - q).sum())
        q = new
        iterations += 1
    return LabelShiftEstimate(q, q / prior, "mlls", iterations)
