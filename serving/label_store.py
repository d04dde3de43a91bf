"""A region's labelled tiles, kept in object storage for few-shot adaptation (JSON and GeoTIFF only, never pickles).

Layout, under ``prefix`` in the store the predictions live in::

    labels/<region>/index.json                   {"format": 1, "added": n, "tiles": [{id, image_href, ...}, ...]}
    labels/<region>/<acquisition_id>.tif         the mask: a single-band COG of class indices, 255 = unlabelled
    labels/<region>/<acquisition_id>.image.tif   a copy of the acquisition's GeoTIFF (``keep_images``)

Why copy the image: delayed labels trickle in over weeks, while acquisitions expire (a bucket lifecycle rule, the
embedded runner's bounded store); a few-shot job that reads a region's first labels long after they came must
still find their images. Labels are rare, so the copies are small next to the acquisitions bucket. Without
``keep_images`` only the acquisition's href is kept and images are read through the ``TileReader``.

Bounded: the most recent ``max_tiles`` labelled tiles of a region are kept (older ones' objects are deleted);
``added`` counts every distinct tile ever added, which is what the few-shot schedule reads. One writer per region:
labels are keyed by region, so one consumer adds a region's labels. Objects are written before the index that
names them (as the registry writes weights before the manifest), so a reader never sees a half-added tile.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from affine import Affine

from adapters.buffer import BufferedTile
from serving.store import BlobStore, TileReader
from terradapt.errors import InvalidPayloadError, InvalidTileError, TerradaptError
from terradapt.raster import RasterSpec, read_prediction, read_raster, write_cog
from terradapt.records import check_region

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
#: What an acquisition id must look like to name an object (no '/', no leading dot: it cannot escape its folder).
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class LabelStore:
    """Labelled tiles per region: a mask COG, the image (a copy, or its href) and a small JSON index.

    Args:
        store: Where the objects live (the predictions' bucket or folder).
        reader: Reads acquisitions by href (the pipeline's ``TileReader``).
        prefix: Key prefix of every object.
        max_tiles: Most recent labelled tiles kept per region.
        keep_images: Copy each acquisition's GeoTIFF beside its mask (see the module docstring).

    """

    def __init__(
        self,
        store: BlobStore,
        reader: TileReader,
        *,
        prefix: str = "labels/",
        max_tiles: int = 64,
        keep_images: bool = True,
    ) -> None:
        if max_tiles < 1:
            raise ValueError(f"max_tiles={max_tiles}; accepted: >= 1")
        self.store = store
        self.reader = reader
        self.prefix = prefix if prefix.endswith("/") else f"{prefix}/"
        self.max_tiles = max_tiles
        self.keep_images = keep_images

    # -- keys and index -------------------------------------------------------------------------------------------
    def _folder(self, region: str) -> str:
        try:
            check_region(region)
        except ValueError as exc:
            raise InvalidPayloadError(str(exc)) from exc
        return f"{self.prefix}{region}/"

    @staticmethod
    def _check_id(acquisition_id: str) -> str:
        if not _SAFE_ID.match(acquisition_id):
            raise InvalidPayloadError(
                f"acquisition_id={acquisition_id!r} cannot name a label object; accepted: letters, digits, "
                "'.', '_', ':', '-', not starting with a dot"
            )
        return acquisition_id

    def _index(self, region: str) -> dict[str, Any]:
        key = f"{self._folder(region)}index.json"
        if not self.store.exists(key):
            return {"format": INDEX_FORMAT, "added": 0, "tiles": []}
        index: dict[str, Any] = json.loads(self.store.get(key))
        if index.get("format") != INDEX_FORMAT:
            raise InvalidPayloadError(f"label index {key} has format {index.get('format')!r}; accepted: {INDEX_FORMAT}")
        return index

    def _write_index(self, region: str, index: dict[str, Any]) -> None:
        data = json.dumps(index, separators=(",", ":")).encode()
        self.store.put(f"{self._folder(region)}index.json", data, "application/json")

    # -- the API ---------------------------------------------------------------------------------------------------
    def add(self, region: str, acquisition_id: str, image_href: str, mask: npt.NDArray[np.uint8]) -> int:
        """Keep one labelled tile (a replay or a corrected label replaces the mask and counts once).

        Args:
            region: The tile's region.
            acquisition_id: Its acquisition.
            image_href: Where the acquisition's GeoTIFF is (read now when ``keep_images``).
            mask: (H, W) class indices, 255 = unlabelled.

        Returns:
            How many distinct labelled tiles the region has had (the few-shot schedule's count).

        Raises:
            InvalidPayloadError: A region or acquisition id that cannot name an object.
            InvalidTileError: The mask is not two-dimensional.
            ObjectNotFoundError: ``keep_images`` and the acquisition is gone.

        """
        folder = self._folder(region)
        self._check_id(acquisition_id)
        if mask.ndim != 2:
            raise InvalidTileError("mask.shape", mask.shape, "(height, width)")
        entry: dict[str, str] = {"id": acquisition_id, "image_href": image_href}
        if self.keep_images:
            entry["image_key"] = f"{folder}{acquisition_id}.image.tif"
            self.store.put(entry["image_key"], self.reader.get(image_href), "image/tiff")
        entry["mask_key"] = f"{folder}{acquisition_id}.tif"
        tags = {"acquisition_id": acquisition_id, "region": region, "image_href": image_href}
        cog = write_cog(mask.astype(np.uint8), None, Affine.identity(), tags=tags)
        self.store.put(entry["mask_key"], cog, "image/tiff")
        index = self._index(region)
        tiles = [t for t in index["tiles"] if t["id"] != acquisition_id]
        if len(tiles) == len(index["tiles"]):
            index["added"] = int(index["added"]) + 1
        tiles.append(entry)
        for old in tiles[: max(0, len(tiles) - self.max_tiles)]:
            self._delete(old)
        index["tiles"] = tiles[-self.max_tiles :]
        self._write_index(region, index)
        return int(index["added"])

    def count(self, region: str) -> int:
        """How many distinct labelled tiles the region has had (kept or not)."""
        return int(self._index(region)["added"])

    def list(self, region: str) -> builtins.list[str]:
        """The acquisition ids of the region's kept labelled tiles, oldest first."""
        return [str(t["id"]) for t in self._index(region)["tiles"]]

    def load(self, region: str, ids: Sequence[str], spec: RasterSpec | None = None) -> builtins.list[BufferedTile]:
        """The labelled tiles ``ids`` (image + mask), in that order; missing or unreadable ones are skipped.

        Tiles, not bare arrays: the id travels with its image and mask, so whatever trains on them records
        exactly the labels it used.
        """
        entries = {t["id"]: t for t in self._index(region)["tiles"]}
        out: builtins.list[BufferedTile] = []
        for tile_id in ids:
            entry = entries.get(tile_id)
            if entry is None:
                log.warning("label %s/%s is not (or no longer) kept", region, tile_id)
                continue
            try:
                key = entry.get("image_key")
                data = self.store.get(key) if key else self.reader.get(entry["image_href"])
                image = read_raster(data, spec).data.astype(np.uint8)
                mask, _ = read_prediction(self.store.get(entry["mask_key"]))
            except TerradaptError as exc:
                log.warning("label %s/%s unusable (%s)", region, tile_id, exc)
                continue
            if mask.shape != image.shape[1:]:
                log.warning("label %s/%s: mask %s does not fit image %s", region, tile_id, mask.shape, image.shape)
                continue
            out.append(BufferedTile(tile_id, image, mask=mask, href=str(entry["image_href"])))
        return out

    def _delete(self, entry: dict[str, str]) -> None:
        for key in (entry.get("image_key"), entry.get("mask_key")):
            if key:
                self.store.delete(key)
