"""The Dubai aerial segmentation set (Humans in the Loop, CC0): 8 areas x 9 RGB images with RGB-coded masks.

Each area is a region ("dubai-1".."dubai-8"): the areas differ a lot in label shares (tile 5 is half water,
tile 4 is 40% buildings), which makes this a *real* leave-areas-out domain-shift benchmark. The data lives in
the shared folder and is read in place (see shared/data/README.md), never copied into the repository.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from terradapt.classes import DUBAI_CLASSES, DUBAI_PALETTE, IGNORE_INDEX
from terradapt.datasets.base import Sample
from terradapt.errors import InvalidTileError, UnknownRegionError
from terradapt.raster import RasterSpec, read_raster

__all__ = ["DEFAULT_ROOT", "ENV_ROOT", "DubaiDataset", "rgb_to_classes"]

#: The project root (terradapt/datasets/dubai.py -> three levels up).
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Where the shared data lives, relative to the project root.
DEFAULT_ROOT = Path("../shared/data/dubai_aerial")
#: Environment variable that overrides the default root.
ENV_ROOT = "TERRADAPT_DUBAI_ROOT"

#: Images are plain JPEG/PNG: 3 bands, no georeferencing.
_IMAGE_SPEC = RasterSpec(band_count=3, require_crs=False, band_names=("red", "green", "blue"))
_MASK_SPEC = RasterSpec(band_count=3, require_crs=False, max_nodata_fraction=1.0)
_PALETTED_SPEC = RasterSpec(band_count=None, require_crs=False, max_nodata_fraction=1.0)
_PALETTE = np.asarray(DUBAI_PALETTE, dtype=np.int32)
#: Palette index -> class index; the last colour ("unlabeled") is ignored.
_PALETTE_TO_CLASS = np.array([*range(len(DUBAI_PALETTE) - 1), IGNORE_INDEX], dtype=np.uint8)


def rgb_to_classes(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Map an RGB mask (3, H, W) to class indices, each pixel taking its nearest palette colour.

    About 2% of some masks are off-palette (compression-like edges), so an exact lookup would drop them.
    Exact colours are matched with one comparison per palette entry; only the few off-palette pixels pay for
    a distance computation, which keeps time and memory flat on 3-megapixel masks.

    Args:
        rgb: Array (3, height, width) of uint8 colours.

    Returns:
        Array (height, width) of class indices 0..4, IGNORE_INDEX for "unlabeled".

    """
    pixels = rgb.astype(np.int32)
    codes = (pixels[0] << 16) | (pixels[1] << 8) | pixels[2]
    palette_codes = (_PALETTE[:, 0] << 16) | (_PALETTE[:, 1] << 8) | _PALETTE[:, 2]
    index = np.full(codes.shape, -1, dtype=np.int64)
    for position, code in enumerate(palette_codes):
        index[codes == code] = position
    off = index < 0
    if off.any():
        colours = pixels[:, off].T  # (n_off, 3)
        distances = ((colours[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(axis=2)
        index[off] = distances.argmin(axis=1)
    return _PALETTE_TO_CLASS[index]


def _mask_rgb(path: Path) -> npt.NDArray[np.uint8]:
    """The mask as RGB (3, H, W): most masks are RGB PNGs, some areas' are paletted PNGs (one band + colormap)."""
    mask = read_raster(path, _PALETTED_SPEC)
    if mask.count == 3:
        return mask.data.astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            colormap = src.colormap(1)
    lut = np.zeros((256, 3), dtype=np.uint8)
    for index, rgba in colormap.items():
        lut[index] = rgba[:3]
    return np.moveaxis(lut[mask.data[0]], -1, 0)


class DubaiDataset:
    """The 72 labelled Dubai images grouped into 8 regions.

    Args:
        root: Folder with `tile1`..`tile8`. When None: the `TERRADAPT_DUBAI_ROOT` environment variable, else
            `DEFAULT_ROOT`. A relative path is resolved against the project root, not the working directory,
            so scripts, tests and services find the shared data from any folder.

    """

    classes: tuple[str, ...] = DUBAI_CLASSES
    band_names: tuple[str, ...] = ("red", "green", "blue")

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            root = os.environ.get(ENV_ROOT) or DEFAULT_ROOT
        self.root = (_PROJECT_ROOT / root).resolve()  # an absolute root stays as it is
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Dubai dataset root {self.root} does not exist; pass root= or set {ENV_ROOT} to the folder "
                "holding tile1..tile8/{images,masks}"
            )
        self._tiles: dict[str, list[str]] = {}
        for area in range(1, 9):
            images = sorted((self.root / f"tile{area}" / "images").glob("*.jpg"))
            if images:
                self._tiles[f"dubai-{area}"] = [image.stem for image in images]
        if not self._tiles:
            raise FileNotFoundError(f"no tileN/images/*.jpg under {self.root}")

    def regions(self) -> list[str]:
        """Region codes "dubai-1".."dubai-8" that have images, sorted."""
        return sorted(self._tiles)

    def tile_ids(self, region: str) -> list[str]:
        """Image names ("image_part_001"...) of a region, sorted."""
        if region not in self._tiles:
            raise UnknownRegionError(region, list(self._tiles))
        return list(self._tiles[region])

    def load(self, region: str, tile_id: str) -> Sample:
        """Read one image and its mask mapped to class indices.

        Raises:
            UnknownRegionError: The region is not in the dataset.
            KeyError: The image is not in the region.
            InvalidTileError: The image or mask is unreadable or the sizes differ.

        """
        if tile_id not in self.tile_ids(region):
            raise KeyError(f"image {tile_id!r} not in region {region!r}")
        folder = self.root / f"tile{region.removeprefix('dubai-')}"
        image = read_raster(folder / "images" / f"{tile_id}.jpg", _IMAGE_SPEC)
        mask_path = folder / "masks" / f"{tile_id}.png"
        mask = None
        if mask_path.is_file():
            rgb = _mask_rgb(mask_path)
            if rgb.shape[1:] != image.data.shape[1:]:
                raise InvalidTileError("mask_shape", rgb.shape[1:], f"the image size {image.data.shape[1:]}")
            mask = rgb_to_classes(rgb)
        return Sample(image.data, mask, region, tile_id, None, image.transform)
