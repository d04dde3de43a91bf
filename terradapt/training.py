"""Supervised training of the source model and evaluation (per-class IoU, mIoU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F  # noqa: N812

from terradapt.checkpoint import ModelManifest
from terradapt.classes import IGNORE_INDEX
from terradapt.metrics import confusion_matrix, iou_per_class, miou
from terradapt.model import UNet, UNetConfig, select_device

Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (CPU-sized defaults)."""

    steps: int = 300
    batch_size: int = 8
    crop: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Evaluation:
    """Per-class IoU and mIoU of a model on labelled tiles."""

    iou: tuple[float, ...]
    miou: float
    pixels: int


def band_normalisation(images: Sequence[Array]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band mean and std over the training images."""
    x = np.concatenate([im.reshape(im.shape[0], -1) for im in images], axis=1).astype(np.float64)
    return torch.tensor(x.mean(axis=1), dtype=torch.float32), torch.tensor(x.std(axis=1), dtype=torch.float32)


def class_band_means(
    images: Sequence[Array], masks: Sequence[Array], num_classes: int
) -> tuple[torch.Tensor, npt.NDArray[np.float64]]:
    """Per-class mean of every band (0..1 scale) and the class pixel shares over labelled training tiles."""
    bands = images[0].shape[0]
    sums = np.zeros((num_classes, bands))
    counts = np.zeros(num_classes)
    for im, mk in zip(images, masks, strict=True):
        flat = mk.ravel().astype(np.int64)
        keep = flat < num_classes
        counts += np.bincount(flat[keep], minlength=num_classes)
        for b in range(bands):
            sums[:, b] += np.bincount(flat[keep], weights=im[b].ravel()[keep] / 255.0, minlength=num_classes)
    means = sums / np.maximum(counts, 1)[:, None]
    return torch.tensor(means, dtype=torch.float32), counts / max(counts.sum(), 1)


def _random_batch(
    images: Sequence[Array], masks: Sequence[Array], size: int, crop: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in rng.integers(0, len(images), size=size):
        im, mk = images[i], masks[i]
        h, w = mk.shape
        c = min(crop, h, w)
        r0, c0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        x, y = im[:, r0 : r0 + c, c0 : c0 + c], mk[r0 : r0 + c, c0 : c0 + c]
        k = int(rng.integers(0, 4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).long()


def train_source_model(
    images: Sequence[Array],
    masks: Sequence[Array],
    model_config: UNetConfig,
    config: TrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> UNet:
    """Train a U-Net with cross-entropy (ignore index respected) on random crops with flips and rotations.

    Args:
        images: (C, H, W) uint8 tiles of the source regions.
        masks: (H, W) class-index masks, IGNORE_INDEX ignored.
        model_config: architecture (in_channels and num_classes must match the data).
        config: optimisation settings.
        progress: called with (step, loss) after every step (the CLI draws a progress bar with it).

    Returns:
        The trained model in eval mode, on CPU.

    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = select_device(config.device)
    model = UNet(model_config)
    mean, std = band_normalisation(images)
    model.set_normalisation(mean, std)
    model.set_class_band_mean(class_band_means(images, masks, model_config.num_classes)[0])
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps)
    for step in range(config.steps):
        x, y = _random_batch(images, masks, config.batch_size, config.crop, rng)
        loss = F.cross_entropy(model(x.to(device)), y.to(device), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    return model.cpu().eval()


def train_source_checkpoint(
    images: Sequence[Array],
    masks: Sequence[Array],
    model_config: UNetConfig,
    config: TrainConfig,
    *,
    classes: tuple[str, ...],
    bands: tuple[str, ...],
    regions: tuple[str, ...],
    tile_ids: Sequence[str] = (),
    progress: Callable[[int, float], None] | None = None,
) -> tuple[UNet, ModelManifest]:
    """Train the source model and describe it (classes, bands, training regions and tiles, source class prior).

    ``tile_ids`` name the training tiles in the manifest, so a calibration on any of them can be refused.
    """
    model = train_source_model(images, masks, model_config, config, progress)
    prior = class_band_means(images, masks, model_config.num_classes)[1]
    manifest = ModelManifest(
        config=model_config.to_dict(),
        classes=classes,
        bands=bands,
        training_regions=regions,
        training_tiles=tuple(tile_ids),
        class_prior=tuple(float(v) for v in prior),
        metrics={"train_steps": float(config.steps)},
    )
    return model, manifest


@torch.no_grad()
def predict_maps(model: UNet, images: Sequence[Array], batch_size: int = 4) -> list[Array]:
    """Class maps of same-sized tiles (eval mode, model's device)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[Array] = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack(images[i : i + batch_size])).float().to(device)
        out.extend(m for m in model(x).argmax(dim=1).to(torch.uint8).cpu().numpy())
    return out


def evaluate(model: UNet, images: Sequence[Array], masks: Sequence[Array]) -> Evaluation:
    """Per-class IoU and mIoU over all tiles pooled (one confusion matrix)."""
    k = model.config.num_classes
    cm = np.zeros((k, k), dtype=np.int64)
    for pred, mask in zip(predict_maps(model, images), masks, strict=True):
        cm += confusion_matrix(pred, mask, k, IGNORE_INDEX)
    ious = iou_per_class(cm)
    return Evaluation(tuple(float(v) for v in ious), miou(cm), int(cm.sum()))
