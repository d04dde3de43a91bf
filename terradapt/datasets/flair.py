"""FLAIR-1 on disk: `<root>/D0NN_YYYY/Z<k>_<xx>/img/IMG_<id>.tif` with masks in `.../msk/MSK_<id>.tif`.

FLAIR-1 (IGN) covers French departements ("domains") with 512x512 aerial tiles of 5 bands at 0.2 m. The
departement is the region: several acquisition years of one departement are one region, because a deployed
model serves a place, whatever the year. Tile ids (`<id>`) are unique across FLAIR, so they identify a tile
within its region without the zone folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from terradapt.classes import FLAIR_BANDS, FLAIR_CLASSES, flair_to_13
from terradapt.datasets.base import Sample
from terradapt.errors import InvalidTileError, UnknownRegionError
from terradapt.raster import RasterSpec, read_raster

__all__ = ["DOMAIN_PATTERN", "FlairDataset", "discover"]

#: Name of a FLAIR domain folder: departement code and year, e.g. "D033_2021" (Corsica: "D02A_2021").
DOMAIN_PATTERN = re.compile(r"^(D0[0-9][0-9AB])_(\d{4})$")
_LAYOUT = "<root>/D0NN_YYYY/Z<k>_<xx>/img/IMG_<id>.tif (e.g. D033_2021/Z1_UA/img/IMG_000001.tif)"
#: Masks are single-band raw labels; they may have no CRS and are allowed to be entirely "unlabelled".
_MASK_SPEC = RasterSpec(band_count=1, require_crs=False, max_nodata_fraction=1.0)


def discover(root: str | Path) -> dict[str, list[Path]]:
    """Find the FLAIR domain folders under `root`, grouped by region.

    Args:
        root: Folder holding the domain folders.

    Returns:
        Region code ("D033") -> its domain folders (one per year), sorted.

    Raises:
        FileNotFoundError: `root` does not exist or holds no folder matching the FLAIR layout.

    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"FLAIR root {root} is not a directory; expected the layout {_LAYOUT}")
    regions: dict[str, list[Path]] = {}
    for domain in sorted(p for p in root.iterdir() if p.is_dir()):
        match = DOMAIN_PATTERN.match(domain.name)
        if match:
            regions.setdefault(match.group(1), []).append(domain)
    if not regions:
        raise FileNotFoundError(f"no FLAIR domain under {root}: expected folders named D0NN_YYYY laid out as {_LAYOUT}")
    return regions


@dataclass(frozen=True)
class _TileFiles:
    image: Path
    mask: Path | None


class FlairDataset:
    """FLAIR-1 tiles read from disk, validated against the FLAIR input contract.

    Args:
        root: Folder with the `D0NN_YYYY` domain folders.
        mask_root: Where the `msk/` folders live when they are not next to `img/` (the official release ships
            images and labels in two trees with the same sub-layout); defaults to `root`.
        spec: Contract every image must satisfy. FLAIR's (5 bands, uint8, EPSG:2154) by default; the tile size
            is not forced, so crops or mosaics of FLAIR imagery are accepted too.

    """

    classes: tuple[str, ...] = FLAIR_CLASSES
    band_names: tuple[str, ...] = FLAIR_BANDS

    def __init__(
        self, root: str | Path, *, mask_root: str | Path | None = None, spec: RasterSpec | None = None
    ) -> None:
        self.root = Path(root)
        self.mask_root = Path(mask_root) if mask_root is not None else self.root
        self.spec = spec or RasterSpec.flair()
        self._tiles: dict[str, dict[str, _TileFiles]] = {}
        for region, domains in discover(self.root).items():
            tiles: dict[str, _TileFiles] = {}
            for domain in domains:
                for image in sorted(domain.glob("Z*/img/IMG_*.tif")):
                    tile_id = image.stem.removeprefix("IMG_")
                    if tile_id in tiles:
                        raise ValueError(f"duplicate FLAIR tile id {tile_id} in region {region}: {image}")
                    mask = self._mask_path(image)
                    tiles[tile_id] = _TileFiles(image, mask if mask.is_file() else None)
            self._tiles[region] = tiles

    def _mask_path(self, image: Path) -> Path:
        zone = image.parent.parent
        relative_zone = zone.relative_to(self.root)
        return self.mask_root / relative_zone / "msk" / f"MSK_{image.stem.removeprefix('IMG_')}.tif"

    def regions(self) -> list[str]:
        """Region codes such as "D033", sorted."""
        return sorted(self._tiles)

    def tile_ids(self, region: str) -> list[str]:
        """Tile ids ("000001"...) of a region, sorted."""
        return sorted(self._region(region))

    def has_mask(self, region: str, tile_id: str) -> bool:
        """Whether the tile has a label mask (FLAIR test sets do not)."""
        return self._files(region, tile_id).mask is not None

    def load(self, region: str, tile_id: str) -> Sample:
        """Read and validate one tile and its mask (raw labels 1..19 mapped to the 13 classes).

        Raises:
            UnknownRegionError: The region is not in the dataset.
            KeyError: The tile id is not in the region.
            InvalidTileError: The image breaks the spec, or the mask does not match the image size.

        """
        files = self._files(region, tile_id)
        raster = read_raster(files.image, self.spec)
        mask = None
        if files.mask is not None:
            raw = read_raster(files.mask, _MASK_SPEC).data[0]
            if raw.shape != (raster.height, raster.width):
                raise InvalidTileError(
                    "mask_shape", raw.shape, f"the image size {(raster.height, raster.width)} ({files.mask})"
                )
            mask = flair_to_13(raw)
        return Sample(raster.data, mask, region, tile_id, raster.crs, raster.transform)

    def _region(self, region: str) -> dict[str, _TileFiles]:
        if region not in self._tiles:
            raise UnknownRegionError(region, list(self._tiles))
        return self._tiles[region]

    def _files(self, region: str, tile_id: str) -> _TileFiles:
        tiles = self._region(region)
        if tile_id not in tiles:
            raise KeyError(f"tile {tile_id!r} not in region {region!r} ({len(tiles)} tiles under {self.root})")
        return tiles[tile_id]
