"""Train a crop model on labelled parcels (CPU, demo size), predict, and score: overall accuracy and macro-F1."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F  # noqa: N812

from terradapt.crops.batch import iter_batches
from terradapt.crops.model import CropModel, PseLtae, PseLtaeConfig
from terradapt.crops.series import ParcelSeries
from terradapt.metrics import confusion_matrix

__all__ = ["CropScores", "CropTrainConfig", "band_statistics", "predict", "score", "train_crop_model"]


@dataclass(frozen=True)
class CropTrainConfig:
    """Source training: epochs, batch size, learning rate, pixels per parcel, seed."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pixels: int = 16
    seed: int = 0


@dataclass(frozen=True)
class CropScores:
    """Overall accuracy, macro-F1 over the classes present in truth, confusion matrix (truth rows)."""

    overall_accuracy: float
    macro_f1: float
    confusion: npt.NDArray[np.int64]


def band_statistics(series: Sequence[ParcelSeries]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-band mean and std of the clear (non-cloudy, non-NaN) pixels of ``series``: the input normalisation."""
    total = np.zeros(series[0].values.shape[1])
    square = np.zeros_like(total)
    count = 0.0
    for s in series:
        clear = ~s.cloud & ~np.isnan(s.values).any(axis=1)  # (T, S)
        v = np.where(clear[:, None, :], np.nan_to_num(s.values), 0.0).astype(np.float64)
        total += v.sum(axis=(0, 2))
        square += (v**2).sum(axis=(0, 2))
        count += float(clear.sum())
    mean = total / max(count, 1.0)
    return mean, np.sqrt(np.maximum(square / max(count, 1.0) - mean**2, 1e-8))


def train_crop_model(
    series: Sequence[ParcelSeries], num_classes: int, config: CropTrainConfig | None = None
) -> tuple[CropModel, float]:
    """Train PSE + L-TAE on labelled series (cross-entropy, AdamW, cosine schedule); return (model, seconds)."""
    config = config or CropTrainConfig()
    labelled = [s for s in series if s.label >= 0]
    if not labelled:
        raise ValueError("train_crop_model needs labelled series (label >= 0)")
    torch.manual_seed(config.seed)
    model = PseLtae(PseLtaeConfig(in_channels=labelled[0].values.shape[1], num_classes=num_classes))
    mean, std = band_statistics(labelled)
    model.set_normalisation(torch.from_numpy(mean).float(), torch.from_numpy(std).float())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(labelled) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        batches = iter_batches(
            labelled, config.batch_size, pixels=config.pixels, seed=config.seed * 1000 + epoch, shuffle=True
        )
        for batch, labels in batches:
            if len(batch) < 2:
                continue  # BatchNorm needs two parcels to estimate batch statistics
            loss = F.cross_entropy(model(batch), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
    model.eval()
    return model, time.perf_counter() - start


@torch.no_grad()
def predict(
    model: CropModel, series: Sequence[ParcelSeries], *, batch_size: int = 256, pixels: int = 16, seed: int = 0
) -> npt.NDArray[np.int64]:
    """Predicted class of every series (eval mode; seeded pixel sampling)."""
    model.eval()
    out = [model(b).argmax(dim=1) for b, _ in iter_batches(series, batch_size, pixels=pixels, seed=seed)]
    return torch.cat(out).numpy().astype(np.int64)


def score(pred: npt.ArrayLike, truth: npt.ArrayLike, num_classes: int) -> CropScores:
    """Overall accuracy and macro-F1 (over classes present in the truth) of predictions."""
    cm = confusion_matrix(np.asarray(pred), np.asarray(truth), num_classes, ignore_index=-1)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    present = support > 0
    total = int(cm.sum())
    return CropScores(
        overall_accuracy=float(tp.sum() / total) if total else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        confusion=cm,
    )
