"""Tests of terradapt.raster: one test per validation error, tiling round trip, COG round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.io import MemoryFile

from terradapt.errors import CorruptTileError, InvalidTileError, ObjectNotFoundError, OversizedTileError
from terradapt.raster import (
    Raster,
    RasterSpec,
    extract_patches,
    plan_windows,
    raster_to_geotiff_bytes,
    read_raster,
    stitch,
    write_cog,
    write_geotiff,
)
from tests.fakes.flair_tiles import write_tile

FLAIR = RasterSpec.flair()


def test_valid_tile_reads_from_path_and_bytes(tmp_path: Path) -> None:
    path = write_tile(tmp_path / "ok.tif")
    from_path = read_raster(path, FLAIR)
    from_bytes = read_raster(path.read_bytes(), FLAIR)
    assert from_path.data.shape == (5, 64, 64)
    assert from_path.crs == "EPSG:2154"
    assert from_path.transform == from_bytes.transform
    np.testing.assert_array_equal(from_path.data, from_bytes.data)


def test_missing_path_is_object_not_found(tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match=r"nope.tif"):
        read_raster(tmp_path / "nope.tif", FLAIR)


@pytest.mark.parametrize("payload", [b"", b"this is not a GeoTIFF" * 20], ids=["empty", "garbage"])
def test_corrupt_bytes(payload: bytes) -> None:
    with pytest.raises(CorruptTileError, match="file=") as info:
        read_raster(payload, FLAIR)
    assert info.value.field == "file"


@pytest.mark.parametrize("keep", [0.01, 0.5], ids=["header-cut", "pixels-cut"])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    # Cut in the header: fails at open; cut in the pixels: opens fine and fails only when pixels are read.
    data = write_tile(tmp_path / "t.tif").read_bytes()
    with pytest.raises(CorruptTileError, match="file="):
        read_raster(data[: int(len(data) * keep)], FLAIR)


def test_wrong_band_count(tmp_path: Path) -> None:
    with pytest.raises(InvalidTileError, match="band_count=3") as info:
        read_raster(write_tile(tmp_path / "t.tif", bands=3), FLAIR)
    assert info.value.field == "band_count"
    assert "5 bands (red, green, blue, nir, elevation)" in str(info.value)


def test_wrong_dtype(tmp_path: Path) -> None:
    with pytest.raises(InvalidTileError, match=r"dtype='uint16'.*uint8"):
        read_raster(write_tile(tmp_path / "t.tif", dtype="uint16"), FLAIR)


def test_missing_crs(tmp_path: Path) -> None:
    with pytest.raises(InvalidTileError, match=r"crs=None.*EPSG:2154"):
        read_raster(write_tile(tmp_path / "t.tif", crs=None), FLAIR)
    # Non-georeferenced images are fine when the spec says so (e.g. JPEG datasets).
    spec = RasterSpec(band_count=5, require_crs=False)
    assert read_raster(write_tile(tmp_path / "t.tif", crs=None), spec).crs is None


def test_wrong_crs(tmp_path: Path) -> None:
    with pytest.raises(InvalidTileError, match=r"crs='EPSG:4326'.*EPSG:2154"):
        read_raster(write_tile(tmp_path / "t.tif", crs="EPSG:4326"), FLAIR)


def test_too_many_pixels(tmp_path: Path) -> None:
    spec = RasterSpec(band_count=5, max_pixels=1000)
    with pytest.raises(OversizedTileError, match=r"pixels=4096.*at most 1000") as info:
        read_raster(write_tile(tmp_path / "t.tif"), spec)
    assert info.value.field == "pixels"


def test_too_many_bytes(tmp_path: Path) -> None:
    data = write_tile(tmp_path / "t.tif").read_bytes()
    with pytest.raises(OversizedTileError, match=f"bytes={len(data)}.*at most 100 bytes"):
        read_raster(data, RasterSpec(max_bytes=100))


def test_too_small(tmp_path: Path) -> None:
    with pytest.raises(InvalidTileError, match=r"size='16x16'.*at least 32x32"):
        read_raster(write_tile(tmp_path / "t.tif", size=16), FLAIR)


def test_nodata_share(tmp_path: Path) -> None:
    path = write_tile(tmp_path / "t.tif", nodata=0, nodata_fraction=0.75)
    with pytest.raises(InvalidTileError, match=r"nodata_fraction=0.75.*at most 0.5") as info:
        read_raster(path, FLAIR)
    assert info.value.field == "nodata_fraction"
    half = write_tile(tmp_path / "h.tif", nodata=0, nodata_fraction=0.25)
    assert read_raster(half, FLAIR).nodata == 0.0


def test_nan_counts_as_nodata(tmp_path: Path) -> None:
    data = np.ones((1, 40, 40), dtype=np.float32)
    data[:, :30] = np.nan
    path = write_geotiff(tmp_path / "f.tif", Raster(data, "EPSG:2154", Affine.identity()))
    with pytest.raises(InvalidTileError, match="nodata_fraction"):
        read_raster(path, RasterSpec(dtype="float32"))


def test_geotiff_round_trip_keeps_everything(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    raster = Raster(
        data=rng.integers(0, 255, (5, 40, 48), dtype=np.uint8),
        crs="EPSG:2154",
        transform=Affine(0.2, 0, 417_000, 0, -0.2, 6_425_000),
        band_names=("red", "green", "blue", "nir", "elevation"),
    )
    back = read_raster(write_geotiff(tmp_path / "r.tif", raster), FLAIR)
    np.testing.assert_array_equal(back.data, raster.data)
    assert (back.crs, back.transform, back.band_names) == (raster.crs, raster.transform, raster.band_names)
    assert raster_to_geotiff_bytes(raster) == raster_to_geotiff_bytes(raster)


@pytest.mark.parametrize(
    ("height", "width", "size", "overlap"),
    [(100, 130, 32, 0), (100, 130, 32, 8), (100, 130, 32, 31), (20, 50, 32, 4), (64, 64, 64, 16)],
)
def test_stitch_of_extracted_patches_is_identity(height: int, width: int, size: int, overlap: int) -> None:
    data = np.random.default_rng(2).random((3, height, width), dtype=np.float32)
    windows = plan_windows(height, width, size, overlap)
    covered = np.zeros((height, width), dtype=int)
    for win in windows:
        covered[win.row : win.row + win.height, win.col : win.col + win.width] += 1
    assert covered.min() >= 1
    patches = extract_patches(data, windows, size)
    assert patches.shape == (len(windows), 3, size, size)
    np.testing.assert_allclose(stitch(windows, patches, height, width), data, rtol=1e-5, atol=1e-6)


def test_plan_windows_rejects_bad_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(10, 10, 8, 8)


def test_stitch_hides_seams() -> None:
    # Two patches disagree (0 vs 1) on their overlap: the blend must ramp smoothly, not jump.
    windows = plan_windows(32, 48, 32, 16)
    scores = np.stack([np.zeros((1, 32, 32)), np.ones((1, 32, 32))]).astype(np.float32)
    row = stitch(windows, scores, 32, 48)[0, 16]
    assert row[0] == 0
    assert row[-1] == 1
    assert np.all(np.diff(row) >= 0)
    assert np.abs(np.diff(row)).max() < 0.2


def test_cog_round_trip(tmp_path: Path) -> None:
    class_map = np.random.default_rng(3).integers(0, 13, (600, 520), dtype=np.uint8)
    class_map[:10] = 255
    transform = Affine(0.2, 0, 417_000, 0, -0.2, 6_425_000)
    encoded = write_cog(class_map, "EPSG:2154", transform, path=tmp_path / "map.tif")
    assert (tmp_path / "map.tif").read_bytes() == encoded
    with MemoryFile(encoded) as memfile, memfile.open() as src:
        assert src.driver == "GTiff"
        assert src.crs.to_string() == "EPSG:2154"
        assert src.transform == transform
        assert src.nodata == 255
        assert src.block_shapes[0] == (256, 256)
        assert src.overviews(1) == [2, 4]
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        np.testing.assert_array_equal(src.read(1), class_map)
    with rasterio.open(tmp_path / "map.tif") as src:
        assert src.compression is not None
        assert src.compression.name.lower() == "deflate"
