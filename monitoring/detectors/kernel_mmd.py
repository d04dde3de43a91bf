"""Windowed kernel maximum mean discrepancy against a fixed source subsample (deep features)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from monitoring.detectors.base import Vector
from monitoring.detectors.windowed import WindowedConfig, WindowedDetector


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
