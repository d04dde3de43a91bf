"""STAC building blocks shared by every item terradapt writes: WGS84 footprints, multihash checksums, band names.

STAC (RFC 7946 GeoJSON) wants ``geometry`` and ``bbox`` in WGS84 longitude/latitude; a tile's own grid (EPSG:2154
metres for FLAIR) belongs in the projection extension (``proj:code``, ``proj:bbox``, ``proj:shape``,
``proj:transform``). ``footprint`` reprojects a native bounding box with each edge densified, so the curved edges of
a projected rectangle are followed and the WGS84 bbox contains the whole tile.

The file extension's ``file:checksum`` is a multihash: for sha256, the code ``0x12``, the length ``0x20`` (32 bytes),
then the digest, written as hex: ``"1220" + sha256 hex``.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: multihash prefix of a sha2-256 digest (code 0x12, 32 bytes), hex
MULTIHASH_SHA256 = "1220"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: a CRS written as authority:code (``proj:code``); anything else (WKT) goes to ``proj:wkt2``
_AUTHORITY_CODE = re.compile(r"^[A-Za-z]+:[0-9A-Za-z.-]+$")
#: points per edge when a bounding box is reprojected (rio-stac and GDAL use 21 too)
DENSIFY_POINTS = 21

#: eo common band names of the bands terradapt knows (``elevation`` has none)
COMMON_NAMES = {"red": "red", "green": "green", "blue": "blue", "nir": "nir", "coastal": "coastal"}

Geometry = dict[str, Any]
BBox = tuple[float, float, float, float]


def multihash_sha256(sha256_hex: str) -> str:
    """The ``file:checksum`` of a sha256 hex digest: ``"1220" + digest``."""
    return MULTIHASH_SHA256 + sha256_hex


def sha256_from_checksum(checksum: str) -> str:
    """The sha256 hex digest of a ``file:checksum``: a sha2-256 multihash, or a bare digest (schema version 1).

    Anything else is returned unchanged: the record keeps what the item said, and a reader that verifies
    checksums reports the mismatch.
    """
    value = checksum.lower()
    if len(value) == 68 and value.startswith(MULTIHASH_SHA256) and _HEX64.match(value[4:]):
        return value[4:]
    return checksum


def is_authority_code(crs: str) -> bool:
    """Whether a CRS string is an ``AUTHORITY:CODE`` (``proj:code``) rather than WKT or PROJ JSON."""
    return bool(_AUTHORITY_CODE.match(crs))


def _ring(bbox: BBox, points: int) -> tuple[list[float], list[float]]:
    """The closed outline of a box, counter-clockwise, with ``points`` per edge (corners included once)."""
    x0, y0, x1, y1 = bbox
    steps = [i / (points - 1) for i in range(points - 1)]
    xs = [x0 + (x1 - x0) * t for t in steps] + [x1] * (points - 1)
    ys = [y0] * (points - 1) + [y0 + (y1 - y0) * t for t in steps]
    xs += [x1 + (x0 - x1) * t for t in steps] + [x0] * (points - 1)
    ys += [y1] * (points - 1) + [y1 + (y0 - y1) * t for t in steps]
    return [*xs, x0], [*ys, y0]


def footprint(bbox: BBox, crs: str | None, points: int = DENSIFY_POINTS) -> tuple[Geometry | None, BBox | None]:
    """A box in ``crs`` as a WGS84 GeoJSON polygon and its lon/lat bbox; ``(None, None)`` when it has none.

    No footprint is given (rather than a wrong one) when the CRS is missing or unknown, the box is empty or
    inverted, or the reprojection leaves valid longitude/latitude ranges.

    Args:
        bbox: (minx, miny, maxx, maxy) in ``crs``.
        crs: The box's CRS (``EPSG:2154``, WKT...), or None.
        points: Points per edge of the reprojected outline.

    Returns:
        The polygon (closed ring, counter-clockwise) and (west, south, east, north), both in EPSG:4326 degrees.

    """
    x0, y0, x1, y1 = bbox
    if crs is None or not all(math.isfinite(v) for v in bbox) or not (x0 < x1 and y0 < y1):
        return None, None
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform

    xs, ys = _ring(bbox, points)
    try:
        lons, lats = transform(CRS.from_user_input(crs), CRS.from_epsg(4326), xs, ys)
    except (CRSError, ValueError, RuntimeError):
        return None, None
    if not all(math.isfinite(v) and -180.0 <= v <= 180.0 for v in lons):
        return None, None
    if not all(math.isfinite(v) and -90.0 <= v <= 90.0 for v in lats):
        return None, None
    ring = [[float(lon), float(lat)] for lon, lat in zip(lons, lats, strict=True)]
    ring[-1] = list(ring[0])  # closed exactly, whatever the last transform's rounding
    geometry = {"type": "Polygon", "coordinates": [ring]}
    return geometry, (float(min(lons)), float(min(lats)), float(max(lons)), float(max(lats)))


def eo_band(name: str) -> dict[str, str]:
    """An ``eo:bands`` entry: the band's name and, when it is one, its eo common name."""
    common = COMMON_NAMES.get(name.lower())
    return {"name": name, "common_name": common} if common else {"name": name}
