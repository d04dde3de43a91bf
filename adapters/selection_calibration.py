"""Calibration of label-free model selection: labelled held-out source tiles under synthetic shifts.

Each calibration domain is a set of held-out source tiles with a class mix of its own and a radiometric shift,
adapted with one method; its row keeps the selection features (``adapters.selection``) and the true mIoU change
measured with the labels. Class mixes are *real*: every source area on its own (areas differ in class mix and
look, like departements), and draws tilted toward each frequent class that keep every class present (a draw of
only the tiles richest in one class gives near single-class sets whose mIoU swings by 50 points on a few stray
pixels: useless to learn from). Shifts: ``TUNING_SHIFTS`` below. The benchmark reports on other shift
families and other areas (bench/selection.py says which), so the estimator is never judged on these.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from adapters.registry import adapter_class, create_adapter
from adapters.selection import SelectionDomain, VersionOutputs, class_shares, selection_features, version_outputs
from monitoring.label_shift import BBSE
from terradapt.augment import gaussian_blur
from terradapt.checkpoint import ModelManifest
from terradapt.classes import IGNORE_INDEX
from terradapt.metrics import confusion_matrix, miou
from terradapt.model import SegmentationModel, bn_layers

log = logging.getLogger(__name__)

Shift = Callable[[npt.NDArray[np.uint8], np.random.Generator], npt.NDArray[np.uint8]]


def radiometric(
    gain: Sequence[float],
    offset: Sequence[float],
    haze: float = 0.0,
    blur: float = 0.0,
    noise: float = 0.0,
) -> Shift:
    """A radiometric shift on 0..255 digital numbers: haze (blend toward airlight), blur, gain/offset, noise."""

    def apply(image: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
        x = image.astype(np.float32)
        c = x.shape[0]
        g = np.resize(np.asarray(gain, dtype=np.float32), c)[:, None, None]
        o = np.resize(np.asarray(offset, dtype=np.float32), c)[:, None, None]
        if haze:
            x = x * (1 - 0.45 * haze) + 255 * haze * np.linspace(0.45, 0.25, c, dtype=np.float32)[:, None, None]
        if blur:
            x = gaussian_blur(x, blur)
        x = x * g + o
        if noise:
            x = x + rng.normal(0.0, noise, x.shape).astype(np.float32)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    return apply


#: The shift families of the selection calibration = the benchmark's *tuning* families.
TUNING_SHIFTS: dict[str, Shift | None] = {
    "none": None,
    "brighter": radiometric((1.25, 1.2, 1.15), (10, 10, 10)),
    "darker": radiometric((0.7, 0.72, 0.75), (-5, -5, 0)),
    "warm-cast": radiometric((1.15, 1.0, 0.82), (12, 4, -6)),
    "haze": radiometric((1.0, 1.0, 1.0), (0, 0, 0), haze=0.35),
    "light-haze": radiometric((1.05, 1.0, 0.95), (0, 0, 0), haze=0.15),
    "blur-noise": radiometric((1.0, 1.0, 1.0), (0, 0, 0), blur=1.2, noise=6.0),
}


def class_mix_subsets(
    masks: Sequence[npt.NDArray[np.uint8]],
    areas: Sequence[str],
    k: int,
    n: int,
    rng: np.random.Generator,
    max_tilts: int = 4,
) -> dict[str, list[int]]:
    """Tile index sets with real class mixes: each area on its own, and draws tilted toward the frequent classes.

    ``max_tilts`` bounds the tilted draws (the most frequent classes first): the calibration's cost grows with them.
    """
    out: dict[str, list[int]] = {}
    for area in sorted(set(areas)):
        idx = [i for i, a in enumerate(areas) if a == area]
        if len(idx) >= 2:
            out[f"area-{area}"] = [int(i) for i in rng.permutation(idx)[:n]]
    shares = np.array([np.bincount(m.ravel(), minlength=256)[:k] / max(int((m < k).sum()), 1) for m in masks])
    frequent = [int(c) for c in np.argsort(-shares.mean(axis=0)) if shares[:, c].mean() >= 0.02][:max_tilts]
    for c in sorted(frequent):
        p = shares[:, c] + 0.02
        out[f"tilt-{c}"] = [
            int(i) for i in rng.choice(len(masks), size=min(n, len(masks)), replace=False, p=p / p.sum())
        ]
    return out


def _centre(a: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """The central ``size`` x ``size`` window of a (..., H, W) array (the whole array when smaller)."""
    h, w = a.shape[-2:]
    r, c = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return a[..., r : r + size, c : c + size]


def _miou(outputs: VersionOutputs, masks: Sequence[npt.NDArray[np.uint8]], k: int) -> float:
    cm = sum(confusion_matrix(p, m, k, IGNORE_INDEX) for p, m in zip(outputs.maps, masks, strict=True))
    return miou(np.asarray(cm))


def calibrate_selection(
    source: SegmentationModel,
    manifest: ModelManifest,
    images: Sequence[npt.NDArray[np.uint8]],
    masks: Sequence[npt.NDArray[np.uint8]],
    areas: Sequence[str],
    *,
    methods: Sequence[str] = ("bn-balanced",),
    shifts: dict[str, Shift | None] | None = None,
    tiles_per_domain: int = 12,
    crop: int | None = 128,
    max_tilts: int = 4,
    batch_size: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> list[SelectionDomain]:
    """The selection's calibration domains: every shift x class-mix subset x method, with its true mIoU change.

    The reference class mix of each domain is what a job gets in service: the BBSE estimate from the source
    model's predicted shares on the domain's tiles, with the confusion matrix of the unshifted calibration tiles.
    Tiles are centre-cropped to ``crop`` pixels (None: whole tiles): the cost is dozens of adaptations, and a
    domain's statistics need many tiles more than large ones.

    Raises:
        ValueError: images, masks and areas differ in length, or fewer than 4 tiles.

    """
    if not len(images) == len(masks) == len(areas) or len(images) < 4:
        raise ValueError(f"need >= 4 labelled tiles with areas, got {len(images)}/{len(masks)}/{len(areas)}")
    rng = np.random.default_rng(seed)
    if not bn_layers(source):  # BatchNorm re-estimation has nothing to act on: such a method never runs here
        skipped = [m for m in methods if adapter_class(m).needs_batchnorm]
        if skipped:
            log.warning("selection not calibrated for %s: the model has no BatchNorm layers", ", ".join(skipped))
        methods = [m for m in methods if m not in skipped]
    if crop is not None:
        images = [_centre(im, crop) for im in images]
        masks = [_centre(m, crop) for m in masks]
    k = source.config.num_classes
    n = max(2, min(tiles_per_domain, len(images) // 2))
    prior = manifest.class_prior or None
    prior_t = torch.tensor(prior, dtype=torch.float32) if prior else None
    dev = torch.device(device)
    base = copy.deepcopy(source).to(dev).eval()
    plain = version_outputs(base, torch.from_numpy(np.stack(images)).float().to(dev))
    confusion = sum(confusion_matrix(p, m, k, IGNORE_INDEX) for p, m in zip(plain.maps, masks, strict=True))
    bbse = BBSE(np.asarray(confusion, dtype=np.float64).T)  # truth rows -> [pred, true]
    domains: list[SelectionDomain] = []
    for subset, idx in class_mix_subsets(masks, areas, k, n, rng, max_tilts).items():
        sub_masks = [masks[i] for i in idx]
        for shift_name, shift in (shifts if shifts is not None else TUNING_SHIFTS).items():
            shifted = [images[i] if shift is None else shift(images[i], rng) for i in idx]
            x = torch.from_numpy(np.stack(shifted)).float().to(dev)
            current = version_outputs(base, x)
            before = _miou(current, sub_masks, k)
            reference = bbse.estimate(class_shares(current.maps, k)).as_tuple()
            for method in methods:
                torch.manual_seed(seed)
                adapter = create_adapter(method, base, {"device": device}, class_prior=prior_t)
                adapted = adapter.adapt(x[i : i + batch_size] for i in range(0, len(x), batch_size))
                candidate = version_outputs(adapted, x)
                domains.append(
                    SelectionDomain(
                        shift=shift_name,
                        subset=subset,
                        method=method,
                        features=selection_features(candidate, current, k, reference, prior),
                        gain=_miou(candidate, sub_masks, k) - before,
                    )
                )
    return domains
