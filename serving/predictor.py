"""Predictors: one interface, in-process (embedded mode, worker) and TorchServe (``serving.torchserve``).

A predictor turns tiles of one region into class maps plus the label-free features the drift monitor uses, with
the region's current model (or an explicit version, for shadow evaluation). Large acquisitions are cut into
overlapping windows whose logits are blended back (terradapt.raster), so any raster size works.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from monitoring.features import TileFeatures, average_features, forward_with_features
from serving.registry import ModelRegistry
from terradapt.model import SegmentationModel, select_device
from terradapt.raster import extract_patches, plan_windows, stitch


@dataclass(frozen=True)
class TileOutput:
    """Prediction of one tile by one model version."""

    class_map: npt.NDArray[np.uint8]
    features: TileFeatures
    version: int


class Predictor(Protocol):
    """Predict tiles of a region with its current (or a given) model version."""

    def predict(
        self, region: str, images: Sequence[npt.NDArray[np.uint8]], version: int | None = None
    ) -> list[TileOutput]:
        """One output per image (C, H, W)."""
        ...


class InProcessPredictor:
    """Runs the models in this process, on cuda when available; caches a bounded number of loaded models."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        device: str = "auto",
        window: int = 512,
        overlap: int = 32,
        batch_size: int = 4,
        cache_size: int = 8,
    ) -> None:
        self.registry = registry
        self.device = select_device(device)
        self.window = window
        self.overlap = overlap
        self.batch_size = batch_size
        self._cache: OrderedDict[tuple[str, int], SegmentationModel] = OrderedDict()
        self._cache_size = cache_size

    def model(self, region: str, version: int) -> SegmentationModel:
        """The loaded model of (region, version), from the bounded LRU cache."""
        key = ("source" if version == 0 else region, version)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        model, _ = self.registry.load(region, version)
        model.to(self.device).eval()
        self._cache[key] = model
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return model

    def predict(
        self, region: str, images: Sequence[npt.NDArray[np.uint8]], version: int | None = None
    ) -> list[TileOutput]:
        """Predict each image; images of the window size or smaller go in batches, larger ones are tiled."""
        v = self.registry.current(region) if version is None else version
        return predict_images(self.model(region, v), images, v, self.device, self.window, self.overlap, self.batch_size)


def to_device(images: npt.NDArray[np.uint8], device: torch.device) -> torch.Tensor:
    """A batch of uint8 images as float32 on ``device``.

    The bytes travel as uint8 (a quarter of float32's size) and are converted on the device; to a GPU they go from
    page-locked (pinned) memory without blocking, so the copy overlaps the host's work until the model needs them.
    """
    batch = torch.from_numpy(np.ascontiguousarray(images))
    on_gpu = device.type == "cuda"
    return (batch.pin_memory() if on_gpu else batch).to(device, non_blocking=on_gpu).float()


def predict_images(
    model: SegmentationModel,
    images: Sequence[npt.NDArray[np.uint8]],
    version: int,
    device: torch.device,
    window: int,
    overlap: int,
    batch_size: int,
) -> list[TileOutput]:
    """Shared prediction routine (also used by the TorchServe handler)."""
    out: list[TileOutput] = []
    small = [i for i, im in enumerate(images) if im.shape[1] <= window and im.shape[2] <= window]
    results: dict[int, TileOutput] = {}
    # batch same-shaped small tiles together
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in small:
        by_shape.setdefault(images[i].shape, []).append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            arr = np.stack([images[i] for i in chunk])
            res = forward_with_features(model, to_device(arr, device), arr)
            maps = res.classes.to(torch.uint8).cpu().numpy()
            for j, i in enumerate(chunk):
                results[i] = TileOutput(maps[j], res.features[j], version)
    for i, im in enumerate(images):
        if i in results:
            continue
        results[i] = _predict_large(model, im, version, device, window, overlap, batch_size)
    out = [results[i] for i in range(len(images))]
    return out


def _predict_large(
    model: SegmentationModel,
    image: npt.NDArray[np.uint8],
    version: int,
    device: torch.device,
    window: int,
    overlap: int,
    batch_size: int,
) -> TileOutput:
    h, w = image.shape[1:]
    windows = plan_windows(h, w, window, overlap)
    patches = extract_patches(image, windows, window)
    scores, feats = [], []
    for s in range(0, len(patches), batch_size):
        arr = patches[s : s + batch_size]
        res = forward_with_features(model, to_device(arr, device), arr)
        scores.append(res.logits.softmax(dim=1).cpu().numpy())
        feats.extend(res.features)
    probs = stitch(windows, np.concatenate(scores), h, w)
    areas = [float(win.height * win.width) for win in windows]
    return TileOutput(probs.argmax(axis=0).astype(np.uint8), average_features(feats, areas), version)
