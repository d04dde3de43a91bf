"""Metrics every layer shares, defined once: confusion matrix, IoU, mIoU, per-pixel entropy, total variation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # only the type: importing this module must not pull torch in (``import monitoring`` stays light)
    import torch


def confusion_matrix(
    pred: npt.NDArray[np.integer], truth: npt.NDArray[np.integer], num_classes: int, ignore_index: int = 255
) -> npt.NDArray[np.int64]:
    """Confusion matrix (truth rows, prediction columns) over pixels whose truth is not ignored."""
    p = np.asarray(pred).ravel().astype(np.int64)
    t = np.asarray(truth).ravel().astype(np.int64)
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + np.clip(p[keep], 0, num_classes - 1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """IoU per class; NaN for classes absent from both truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def miou(cm: npt.NDArray[np.int64]) -> float:
    """Mean IoU over classes present in truth or prediction (NaN-free: 0.0 when nothing is present)."""
    ious = iou_per_class(cm)
    present = ~np.isnan(ious)
    return float(ious[present].mean()) if present.any() else 0.0


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax over dim 1, per pixel: (N, K, H, W) -> (N, H, W), (N, K) -> (N,).

    Computed from ``log_softmax`` (no ``log(0)``), so it is exact for confident pixels too. The drift features,
    the gate and the entropy-minimisation adapters all use this one definition.
    """
    return entropy_of_log_probs(logits.log_softmax(dim=1))


def entropy_of_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """``pixel_entropy`` from log-probabilities already computed (the class dimension is dim 1)."""
    return -(log_p.exp() * log_p).sum(dim=1)


def total_variation(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Total-variation distance between two class distributions (half the L1 distance)."""
    return 0.5 * float(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())
