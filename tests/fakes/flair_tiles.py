"""Tiny seeded GeoTIFF writers shaped like FLAIR tiles, with knobs to break one contract field at a time.

They write through rasterio directly rather than through `terradapt.raster`, so the reader is tested against
files it did not produce itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

#: Lambert-93 origin of the fake tiles (somewhere in Gironde).
ORIGIN = (417_000.0, 6_425_000.0)


def write_tile(
    path: str | Path,
    *,
    bands: int = 5,
    dtype: str = "uint8",
    size: int = 64,
    crs: str | None = "EPSG:2154",
    nodata: float | None = None,
    nodata_fraction: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a random tile at `path` and return the path.

    Args:
        path: Destination file (parents are created).
        bands: Number of bands.
        dtype: Data type of every band.
        size: Height and width in pixels.
        crs: CRS string, or None to write a non-georeferenced file.
        nodata: Nodata value to declare, if any.
        nodata_fraction: Share of the top rows filled with `nodata` in every band (needs `nodata`).
        seed: Seed of the pixel values.
    """
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 200, size=(bands, size, size)).astype(dtype)
    if nodata_fraction > 0:
        if nodata is None:
            raise ValueError("nodata_fraction needs a nodata value")
        data[:, : round(size * nodata_fraction), :] = nodata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": bands,
        "dtype": dtype,
        "crs": crs,
        "transform": Affine(0.2, 0.0, ORIGIN[0], 0.0, -0.2, ORIGIN[1]),  # not from_origin: it warns under affine 3.1
        "nodata": nodata,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path
