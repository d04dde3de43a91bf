"""Segmentation metrics (confusion matrix, per-class IoU, mIoU) with an ignore index."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


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
