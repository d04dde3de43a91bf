"""The record every dataset yields (`Sample`) and the small contract datasets implement (`TileDataset`).

Datasets are organised by *region* because regions are the unit of domain shift in terradapt: drift is
monitored, and models are adapted, per region (a French departement, a Dubai area...).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from affine import Affine

from terradapt.classes import IGNORE_INDEX
from terradapt.raster import extract_patches, plan_windows

__all__ = ["Sample", "TileDataset", "iter_patches"]


@dataclass
class Sample:
    """One georeferenced image with its (optional) label mask.

    Attributes:
        image: Pixels (bands, height, width), uint8.
        mask: Class indices (height, width), uint8, IGNORE_INDEX where unlabelled; None for unlabelled data
            (a test set or a live stream).
        region: Region code, e.g. "D033" or "dubai-3".
        tile_id: Identifier of the tile, unique within its dataset.
        crs: CRS string, or None when the source is not georeferenced.
        transform: Pixel-to-CRS transform (identity when not georeferenced).

    """

    image: npt.NDArray[np.uint8]
    mask: npt.NDArray[np.uint8] | None
    region: str
    tile_id: str
    crs: str | None
    transform: Affine

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise ValueError(f"Sample.image must be (bands, height, width), got {self.image.shape}")
        if self.mask is not None and self.mask.shape != self.image.shape[1:]:
            raise ValueError(f"Sample.mask shape {self.mask.shape} != image size {self.image.shape[1:]}")


@runtime_checkable
class TileDataset(Protocol):
    """What training, evaluation and the demo stream need from a dataset, whatever its storage."""

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; a mask value i means classes[i]."""
        ...

    @property
    def band_names(self) -> tuple[str, ...]:
        """Names of the image bands, in order."""
        ...

    def regions(self) -> list[str]:
        """Region codes, sorted."""
        ...

    def tile_ids(self, region: str) -> list[str]:
        """Tile identifiers of a region, sorted."""
        ...

    def load(self, region: str, tile_id: str) -> Sample:
        """Load one tile with its mask (mapped to class indices)."""
        ...


def iter_patches(sample: Sample, size: int, stride: int | None = None) -> Iterator[Sample]:
    """Cut a sample into size x size patches, e.g. to train a fixed-input model on large images.

    Patches cover the whole image (the last row/column of patches is shifted back to end at the border);
    images smaller than `size` give one patch, reflect-padded, with the padding masked as IGNORE_INDEX so it
    never counts as a label. Each patch keeps a correct transform.

    Args:
        sample: The sample to cut.
        size: Patch side in pixels.
        stride: Step between patches, in [1, size]; `size` (no overlap) when None.

    Yields:
        Patches with tile ids "<tile_id>_r<row>_c<col>".

    Raises:
        ValueError: A stride outside [1, size].

    """
    stride = size if stride is None else stride
    if not 1 <= stride <= size:
        raise ValueError(f"stride must be in [1, size={size}], got {stride}")
    height, width = sample.image.shape[1:]
    windows = plan_windows(height, width, size, size - stride)
    images = extract_patches(sample.image, windows, size)
    masks = None
    if sample.mask is not None:
        masks = extract_patches(sample.mask[None], windows, size, mode="constant")
        masks[:, :, min(height, size) :, :] = IGNORE_INDEX
        masks[:, :, :, min(width, size) :] = IGNORE_INDEX
    for index, win in enumerate(windows):
        yield Sample(
            image=images[index],
            mask=None if masks is None else masks[index, 0],
            region=sample.region,
            tile_id=f"{sample.tile_id}_r{win.row}_c{win.col}",
            crs=sample.crs,
            transform=sample.transform @ Affine.translation(win.col, win.row),
        )
