"""Supervised training of the source model (``terradapt.protocols``), its held-out split, and evaluation."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel

from terradapt.architectures import architecture_of, model_from_config
from terradapt.checkpoint import ModelManifest
from terradapt.classes import IGNORE_INDEX
from terradapt.metrics import confusion_matrix, iou_per_class, miou
from terradapt.model import ArchConfig, SegmentationModel, select_device
from terradapt.protocols import SourceData, create_protocol

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


def train_source_model(
    images: Sequence[Array],
    masks: Sequence[Array],
    model_config: ArchConfig,
    config: TrainConfig,
    progress: Callable[[int, float], None] | None = None,
    *,
    protocol: str = "erm",
    protocol_config: dict[str, Any] | BaseModel | None = None,
    domains: Sequence[str] | None = None,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> SegmentationModel:
    """Train a segmentation model (any architecture) with cross-entropy on random crops with flips and rotations.

    The ignore index is respected.

    Args:
        images: (C, H, W) uint8 tiles of the source regions.
        masks: (H, W) class-index masks, IGNORE_INDEX ignored.
        model_config: architecture (``UNetConfig``, ``SmpConfig``; in_channels and num_classes must match the data).
        config: optimisation settings.
        progress: called with (step, loss) after every step (the CLI draws a progress bar with it).
        protocol: a registered source-training protocol (``terradapt.protocols.available_protocols()``); "erm"
            gives the same model as before protocols existed.
        protocol_config: that protocol's own config (validated; unknown keys are errors).
        domains: the region of every image (the domains of ``irm`` and ``reptile``); one domain when None.
        normalisation: fixed per-band (mean, std) in raw band units (a preset's, e.g. FLAIR's); None computes them
            from the training images.

    Returns:
        The trained model in eval mode, on CPU.

    Raises:
        UnknownNameError: the protocol is not registered (the message lists the valid ones).
        pydantic.ValidationError: the protocol config has an unknown key or a bad value.
        ValueError: ``domains`` (or ``masks``) do not match ``images`` one to one.

    """
    method = create_protocol(protocol, protocol_config)  # fail on a bad name or config before any work
    data = SourceData(images, masks, domains)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = select_device(config.device)
    model = model_from_config(model_config)
    mean, std = normalisation if normalisation is not None else band_normalisation(images)
    model.set_normalisation(mean, std)
    model.set_class_band_mean(class_band_means(images, masks, model_config.num_classes)[0])
    model.to(device).train()
    method.fit(model, data, config, rng, progress)
    return model.cpu().eval()


def holdout_split(regions: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split tiles into (training, held-out calibration) indices: a seeded, shuffled share of every region.

    Why per region: the drift monitor is calibrated on what the source model sees on *unseen* source tiles, and
    each source region must be represented on both sides. Why shuffled: tiles come in spatial zones, and taking
    the last tiles in order would hold out whole zones (a shift of its own) instead of a sample of the region.
    Each region's shuffle is seeded by (seed, region), so adding a region does not move another's split. Every
    region keeps at least one training tile.

    Args:
        regions: the region of every tile.
        fraction: share of each region's tiles held out, in [0, 1).
        seed: split seed.

    Returns:
        Sorted training indices and sorted held-out indices.

    Raises:
        ValueError: ``fraction`` outside [0, 1).

    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction={fraction!r}; accepted: 0 <= fraction < 1")
    by_region: dict[str, list[int]] = {}
    for i, region in enumerate(regions):
        by_region.setdefault(region, []).append(i)
    train: list[int] = []
    held: list[int] = []
    for region, idx in by_region.items():
        order = np.random.default_rng([seed, zlib.crc32(region.encode())]).permutation(len(idx))
        n_held = min(int(np.floor(fraction * len(idx) + 0.5)), len(idx) - 1)
        held += [idx[j] for j in order[:n_held]]
        train += [idx[j] for j in order[n_held:]]
    return sorted(train), sorted(held)


def train_source_checkpoint(
    images: Sequence[Array],
    masks: Sequence[Array],
    model_config: ArchConfig,
    config: TrainConfig,
    *,
    classes: tuple[str, ...],
    bands: tuple[str, ...],
    regions: tuple[str, ...],
    tile_ids: Sequence[str] = (),
    progress: Callable[[int, float], None] | None = None,
    protocol: str = "erm",
    protocol_config: dict[str, Any] | BaseModel | None = None,
    domains: Sequence[str] | None = None,
    calibration_tiles: Sequence[str] = (),
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[SegmentationModel, ModelManifest]:
    """Train the source model and describe it (classes, bands, training regions and tiles, source class prior).

    ``tile_ids`` name the training tiles in the manifest, so a calibration on any of them can be refused;
    ``calibration_tiles`` name the tiles held out for calibrating the drift monitor (``terradapt registry-init``
    uses them by default). The manifest also records the training ``protocol``.

    Raises:
        ValueError: a calibration tile is also a training tile.
        UnknownNameError: the protocol is not registered.

    """
    overlap = sorted(set(calibration_tiles) & set(tile_ids))
    if overlap:
        raise ValueError(f"{len(overlap)} calibration tile(s) are also training tiles: {', '.join(overlap[:5])}")
    model = train_source_model(
        images,
        masks,
        model_config,
        config,
        progress,
        protocol=protocol,
        protocol_config=protocol_config,
        domains=domains,
        normalisation=normalisation,
    )
    prior = class_band_means(images, masks, model_config.num_classes)[1]
    manifest = ModelManifest(
        architecture=architecture_of(model_config),
        config=model_config.to_dict(),
        classes=classes,
        bands=bands,
        training_regions=regions,
        training_tiles=tuple(tile_ids),
        class_prior=tuple(float(v) for v in prior),
        metrics={"train_steps": float(config.steps)},
        protocol=protocol,
        calibration_tiles=tuple(calibration_tiles),
    )
    return model, manifest


@torch.no_grad()
def predict_maps(model: SegmentationModel, images: Sequence[Array], batch_size: int = 4) -> list[Array]:
    """Class maps of same-sized tiles (eval mode, model's device)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[Array] = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack(images[i : i + batch_size])).float().to(device)
        out.extend(m for m in model(x).argmax(dim=1).to(torch.uint8).cpu().numpy())
    return out


def evaluate(model: SegmentationModel, images: Sequence[Array], masks: Sequence[Array]) -> Evaluation:
    """Per-class IoU and mIoU over all tiles pooled (one confusion matrix)."""
    k = model.config.num_classes
    cm = np.zeros((k, k), dtype=np.int64)
    for pred, mask in zip(predict_maps(model, images), masks, strict=True):
        cm += confusion_matrix(pred, mask, k, IGNORE_INDEX)
    ious = iou_per_class(cm)
    return Evaluation(tuple(float(v) for v in ious), miou(cm), int(cm.sum()))
