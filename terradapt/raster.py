"""Raster I/O at the edge of the pipeline: validated reads, GeoTIFF/COG writes, tiling and stitching.

Every tile that enters terradapt goes through `read_raster`, which checks the cheap things (byte size, format,
pixel count, decoded size, block size, bands, dtype, CRS, size) from the header *before* decoding pixels, so an
oversized or malformed upload costs almost nothing to reject: what a decode may allocate is bounded by the
spec, never by what a header claims (a 77 kB file declaring 100000 x 100000 pixels is refused unread). Only
image formats that cannot reference other files are opened (no VRT that would read a local path or a URL).
Failures raise the typed errors of `terradapt.errors`, whose messages name the field, the value and what would
be accepted: they end up verbatim in dead-letter records.

Tiling (`plan_windows` / `extract_patches` / `stitch`) lets a fixed-size model run on rasters of any size;
`stitch` blends overlapping predictions with a smooth weight so that patch seams do not show in the class map.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from terradapt.classes import FLAIR_BANDS
from terradapt.errors import CorruptTileError, InvalidTileError, ObjectNotFoundError, OversizedTileError

__all__ = [
    "Raster",
    "RasterSpec",
    "Window",
    "extract_patches",
    "plan_windows",
    "raster_to_geotiff_bytes",
    "read_raster",
    "stitch",
    "write_cog",
    "write_geotiff",
]


@dataclass(frozen=True)
class RasterSpec:
    """The input contract a raster must satisfy; the defaults accept any georeferenced uint8 raster.

    Attributes:
        band_count: Required number of bands, or None for any.
        dtype: Required data type of every band.
        require_crs: Reject rasters without a CRS (predictions must be georeferenced to be used downstream).
        expected_crs: Required CRS (e.g. "EPSG:2154"), or None for any.
        max_pixels: Largest accepted height x width; guards memory before pixels are decoded.
        max_decoded_bytes: Largest accepted decoded size (height x width x bands x bytes per sample), and largest
            accepted internal block (tile or strip, all bands): what decoding may allocate, known from the header.
        max_bytes: Largest accepted encoded size in bytes.
        drivers: GDAL drivers allowed to open the bytes: image formats that never read another file or URL
            (a VRT payload could make the worker read local files or fetch URLs).
        min_size: Smallest accepted height and width: smaller tiles carry too little context to segment.
        max_nodata_fraction: Largest accepted share of nodata (or NaN) pixels.
        band_names: Expected band names, only used to make the band-count error message self-explanatory.

    """

    band_count: int | None = None
    dtype: str = "uint8"
    require_crs: bool = True
    expected_crs: str | None = None
    max_pixels: int = 64_000_000
    max_decoded_bytes: int = 512 * 1024 * 1024
    max_bytes: int = 256 * 1024 * 1024
    drivers: tuple[str, ...] = ("GTiff", "PNG", "JPEG")
    min_size: int = 32
    max_nodata_fraction: float = 0.5
    band_names: tuple[str, ...] | None = None

    @classmethod
    def flair(cls) -> RasterSpec:
        """FLAIR-1 aerial tiles: 5 uint8 bands (R, G, B, NIR, elevation) in Lambert-93."""
        return cls(band_count=5, dtype="uint8", expected_crs="EPSG:2154", band_names=FLAIR_BANDS, drivers=("GTiff",))

    def accepted_bands(self) -> str:
        """Human-readable description of the accepted band count, used in error messages."""
        if self.band_count is None:
            return "any number of bands"
        names = f" ({', '.join(self.band_names)})" if self.band_names else ""
        return f"{self.band_count} bands{names}"


@dataclass
class Raster:
    """Pixels plus the georeferencing needed to write them back or map predictions on the ground.

    Attributes:
        data: Pixel array of shape (bands, height, width).
        crs: CRS as a string such as "EPSG:2154", or None for non-georeferenced images.
        transform: Pixel-to-CRS affine transform (identity when not georeferenced).
        nodata: Nodata value shared by all bands, if any.
        band_names: Band descriptions stored in the file, when every band has one.

    """

    data: npt.NDArray[Any]
    crs: str | None
    transform: Affine
    nodata: float | None = None
    band_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Raster.data must have shape (bands, height, width), got {self.data.shape}")

    @property
    def count(self) -> int:
        """Number of bands."""
        return int(self.data.shape[0])

    @property
    def height(self) -> int:
        """Number of rows."""
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        """Number of columns."""
        return int(self.data.shape[2])


def _encoded_size(source: str | Path | bytes) -> int | None:
    """Byte size of the encoded raster, or None for remote URIs that GDAL fetches itself."""
    if isinstance(source, bytes):
        return len(source)
    if "://" in str(source):
        return None
    path = Path(source)
    if not path.is_file():
        raise ObjectNotFoundError(str(path))
    return path.stat().st_size


def _itemsize(dtype: str) -> int:
    """Bytes per sample of a rasterio dtype name (GDAL-only names such as complex_int16 counted as the widest)."""
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 16


def _check_header(src: Any, spec: RasterSpec) -> None:
    """Validate everything the header tells, before any pixel is decoded.

    The size checks come first and bound what ``src.read()`` may allocate: the output array (height x width x
    bands x bytes per sample) and each internal block GDAL decodes whole (a tile may be far larger than the
    image it belongs to).
    """
    height, width, count = int(src.height), int(src.width), int(src.count)
    if height * width > spec.max_pixels:
        raise OversizedTileError(
            "pixels",
            height * width,
            f"at most {spec.max_pixels} pixels (height x width), got {height}x{width}",
        )
    if count < 1:
        raise InvalidTileError("band_count", count, spec.accepted_bands())
    if spec.band_count is not None and count != spec.band_count:
        raise InvalidTileError("band_count", count, spec.accepted_bands())
    itemsize = max(_itemsize(str(d)) for d in src.dtypes)
    decoded = height * width * count * itemsize
    if decoded > spec.max_decoded_bytes:
        raise OversizedTileError(
            "decoded_bytes",
            decoded,
            f"at most {spec.max_decoded_bytes} bytes once decoded, got {height}x{width} pixels x {count} bands x "
            f"{itemsize} bytes",
        )
    for block_height, block_width in set(src.block_shapes):
        block = int(block_height) * int(block_width) * count * itemsize
        if block > spec.max_decoded_bytes:
            raise OversizedTileError(
                "block_bytes",
                block,
                f"internal blocks of at most {spec.max_decoded_bytes} bytes, got {block_height}x{block_width} "
                f"pixels x {count} bands x {itemsize} bytes",
            )
    bad_dtypes = sorted({str(d) for d in src.dtypes if str(d) != spec.dtype})
    if bad_dtypes:
        raise InvalidTileError("dtype", ",".join(bad_dtypes), f"{spec.dtype} for every band")
    if src.crs is None:
        if spec.require_crs or spec.expected_crs is not None:
            raise InvalidTileError("crs", None, spec.expected_crs or "any CRS (the tile must be georeferenced)")
    elif spec.expected_crs is not None and src.crs != CRS.from_user_input(spec.expected_crs):
        raise InvalidTileError("crs", src.crs.to_string(), spec.expected_crs)
    if min(height, width) < spec.min_size:
        raise InvalidTileError("size", f"{height}x{width}", f"at least {spec.min_size}x{spec.min_size} pixels")


def nodata_fraction(data: npt.NDArray[Any], nodata: float | None) -> float:
    """Share of pixels that carry no data.

    A pixel counts as nodata when every band equals the nodata value (a dark pixel in one band is still data)
    or when any band is NaN (a NaN makes the whole pixel unusable for a model).

    Args:
        data: Array of shape (bands, height, width).
        nodata: The declared nodata value, or None.

    Returns:
        The fraction in [0, 1].

    """
    missing = np.zeros(data.shape[1:], dtype=bool)
    if nodata is not None and not np.isnan(nodata):
        missing |= np.all(data == nodata, axis=0)
    if np.issubdtype(data.dtype, np.floating):
        missing |= np.any(np.isnan(data), axis=0)
    return float(missing.mean()) if missing.size else 0.0


def read_raster(source: str | Path | bytes, spec: RasterSpec | None = None) -> Raster:
    """Read and validate a raster from a path, URI or in-memory bytes.

    Args:
        source: A local path, a URI GDAL understands, or the encoded file bytes.
        spec: The contract to enforce; `RasterSpec()` (any georeferenced uint8 raster) when None.

    Returns:
        The decoded raster.

    Raises:
        ObjectNotFoundError: A local path does not exist.
        OversizedTileError: Too many bytes or pixels, or more decoded bytes (whole raster, or one internal block)
            than ``spec.max_decoded_bytes``: refused from the header, before any pixel is decoded.
        CorruptTileError: The data is not a readable raster of an allowed format (``spec.drivers``), or is truncated.
        InvalidTileError: Wrong band count, dtype, CRS, size, too much nodata, or a path in a format outside
            ``spec.drivers`` (field ``format``).

    """
    spec = spec or RasterSpec()
    size = _encoded_size(source)
    if size is not None and size > spec.max_bytes:
        raise OversizedTileError("bytes", size, f"at most {spec.max_bytes} bytes")
    if size == 0:
        raise CorruptTileError("empty file")
    with ExitStack() as stack, warnings.catch_warnings():
        # JPEG/PNG inputs legitimately have no georeferencing; require_crs decides whether that is an error.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            if isinstance(source, bytes):  # bytes from a message: GDAL tries no other driver than these
                src = stack.enter_context(stack.enter_context(MemoryFile(source)).open(driver=list(spec.drivers)))
            else:
                src = stack.enter_context(rasterio.open(source))
        except RasterioError as exc:
            raise CorruptTileError(f"cannot open as {'/'.join(spec.drivers)}: {exc}") from exc
        if src.driver not in spec.drivers:
            raise InvalidTileError("format", src.driver, " or ".join(spec.drivers), reason="corrupt_tile")
        _check_header(src, spec)
        try:
            data = src.read()
        except RasterioError as exc:  # truncated files often open fine and fail only here
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""  # GDAL's own words
            raise CorruptTileError(f"cannot read pixels: {exc}{cause}") from exc
        descriptions = tuple(src.descriptions)
        raster = Raster(
            data=data,
            crs=src.crs.to_string() if src.crs is not None else None,
            transform=Affine(*src.transform[:6]),
            nodata=None if src.nodata is None else float(src.nodata),
            band_names=descriptions if all(descriptions) else None,
        )
    fraction = nodata_fraction(raster.data, raster.nodata)
    if fraction > spec.max_nodata_fraction:
        raise InvalidTileError("nodata_fraction", round(fraction, 4), f"at most {spec.max_nodata_fraction}")
    return raster


def raster_to_geotiff_bytes(raster: Raster) -> bytes:
    """Encode a raster as a deflate-compressed GeoTIFF (deterministic: same raster, same bytes)."""
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": raster.height,
        "width": raster.width,
        "count": raster.count,
        "dtype": str(raster.data.dtype),
        "crs": raster.crs,
        "transform": raster.transform,
        "nodata": raster.nodata,
        "compress": "deflate",
    }
    with MemoryFile() as memfile, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memfile.open(**profile) as dst:
            dst.write(raster.data)
            for index, name in enumerate(raster.band_names or (), start=1):
                dst.set_band_description(index, name)
        return bytes(memfile.read())


def write_geotiff(path: str | Path, raster: Raster) -> Path:
    """Write a raster as a GeoTIFF file (parents created) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raster_to_geotiff_bytes(raster))
    return path


def write_cog(
    class_map: npt.NDArray[np.uint8],
    crs: str | None,
    transform: Affine,
    nodata: int = 255,
    path: str | Path | None = None,
    *,
    blocksize: int = 256,
    tags: dict[str, str] | None = None,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> bytes:
    """Encode a class map as a Cloud-Optimized GeoTIFF.

    A COG is tiled with internal overviews, so a map viewer can fetch only the blocks and zoom level it shows
    over HTTP range requests. Overviews use *mode* resampling: averaging class indices would invent classes.

    Args:
        class_map: Array (height, width) of class indices.
        crs: CRS string, kept in the file.
        transform: Pixel-to-CRS transform, kept in the file.
        nodata: Value of unlabelled pixels (IGNORE_INDEX by default).
        path: Also write the bytes there when given.
        blocksize: Internal tile size; overviews are built until the image fits in one block.
        tags: Dataset metadata kept in the file (e.g. which model version made the prediction).
        colormap: Colour table of band 1 (value -> RGBA), e.g. ``terradapt.legend.Legend.colormap()``.

    Returns:
        The encoded COG bytes.

    """
    if class_map.ndim != 2:
        raise ValueError(f"class_map must have shape (height, width), got {class_map.shape}")
    height, width = class_map.shape
    profile: dict[str, Any] = {
        "driver": "COG",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "compress": "deflate",
        "blocksize": blocksize,
        "overview_resampling": "mode",
    }
    with MemoryFile() as memfile, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memfile.open(**profile) as dst:
            dst.write(class_map.astype(np.uint8, copy=False), 1)
            if tags:
                dst.update_tags(**tags)
            if colormap:
                dst.write_colormap(1, colormap)
        encoded = bytes(memfile.read())
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(encoded)
    return encoded


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels; `height`/`width` may be smaller than the patch size for small rasters."""

    row: int
    col: int
    height: int
    width: int


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one axis: regular steps, the last one shifted back so it ends at the border."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def plan_windows(height: int, width: int, size: int, overlap: int = 0) -> list[Window]:
    """Cover a raster with windows of `size` pixels overlapping by `overlap` pixels.

    Args:
        height: Raster rows.
        width: Raster columns.
        size: Patch side (the model input size).
        overlap: Pixels shared by neighbouring windows, in [0, size).

    Returns:
        Row-major windows covering every pixel, clipped to the raster when it is smaller than `size`.

    Raises:
        ValueError: Non-positive sizes or an overlap outside [0, size).

    """
    if height <= 0 or width <= 0 or size <= 0:
        raise ValueError(f"height, width and size must be positive, got {height}, {width}, {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size={size}), got {overlap}")
    stride = size - overlap
    return [
        Window(row, col, min(size, height), min(size, width))
        for row in _starts(height, size, stride)
        for col in _starts(width, size, stride)
    ]


def extract_patches(
    data: npt.NDArray[Any],
    windows: list[Window],
    size: int,
    mode: Literal["reflect", "constant"] = "reflect",
) -> npt.NDArray[Any]:
    """Cut the windows out of `data` (C, H, W) into an array (N, C, size, size).

    Windows smaller than `size` are padded at the bottom/right so that `stitch` can crop them back; reflect
    padding keeps image statistics (and BatchNorm statistics) closer to real content than zeros.
    """
    patches = np.empty((len(windows), data.shape[0], size, size), dtype=data.dtype)
    for index, win in enumerate(windows):
        patch = data[:, win.row : win.row + win.height, win.col : win.col + win.width]
        pad = ((0, 0), (0, size - patch.shape[1]), (0, size - patch.shape[2]))
        if pad[1][1] or pad[2][1]:
            patch = np.pad(patch, pad, mode=mode)
        patches[index] = patch
    return patches


def blend_weight(size: int) -> npt.NDArray[np.float32]:
    """Build a 2-D Hann-like weight, ~1 in the patch centre and small (never zero) at its borders.

    Predictions are least reliable near patch borders (missing context); weighting them down makes the
    transition between overlapping patches smooth, so no seam shows. It stays positive so that raster borders
    covered by a single patch are still defined.
    """
    ramp = 0.5 - 0.5 * np.cos(2.0 * np.pi * (np.arange(size, dtype=np.float64) + 0.5) / size)
    ramp = np.maximum(ramp, 1e-3)
    return np.outer(ramp, ramp).astype(np.float32)


def stitch(
    windows: list[Window], patch_scores: npt.NDArray[np.floating[Any]], height: int, width: int
) -> npt.NDArray[np.float32]:
    """Blend per-patch scores (N, K, size, size) back into a (K, height, width) map.

    Args:
        windows: The windows the patches were cut from (as planned by `plan_windows`).
        patch_scores: Scores (logits or probabilities) per patch.
        height: Raster rows.
        width: Raster columns.

    Returns:
        Weighted average of the overlapping scores, float32.

    Raises:
        ValueError: The number of windows and patches differ, or the patches are not square.

    """
    if patch_scores.ndim != 4 or len(windows) != patch_scores.shape[0]:
        raise ValueError(f"expected {len(windows)} patches of shape (K, size, size), got {patch_scores.shape}")
    size = patch_scores.shape[2]
    if patch_scores.shape[3] != size:
        raise ValueError(f"patches must be square, got {patch_scores.shape[2:]}")
    weight = blend_weight(size)
    total = np.zeros((patch_scores.shape[1], height, width), dtype=np.float32)
    weight_sum = np.zeros((height, width), dtype=np.float32)
    for win, scores in zip(windows, patch_scores, strict=True):
        rows = slice(win.row, win.row + win.height)
        cols = slice(win.col, win.col + win.width)
        local = weight[: win.height, : win.width]
        total[:, rows, cols] += scores[:, : win.height, : win.width] * local
        weight_sum[rows, cols] += local
    total /= np.maximum(weight_sum, np.float32(1e-12))
    return total


def read_prediction(data: bytes) -> tuple[npt.NDArray[np.uint8], dict[str, str]]:
    """The class map and tags of a prediction COG written by ``write_cog``.

    Raises:
        CorruptTileError: The bytes are not a readable GeoTIFF.

    """
    try:
        with MemoryFile(data) as mem, mem.open() as src:
            return src.read(1).astype(np.uint8), dict(src.tags())
    except RasterioError as exc:
        raise CorruptTileError(str(exc)) from exc
