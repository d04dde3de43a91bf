"""Fuzzing the raster read path, and what a header may make it allocate.

Byte-level mutants of valid FLAIR-shaped tiles (bit flips, truncation, splicing, rewritten header tags) go
through ``read_raster`` exactly as the worker calls it, in a child process with a capped address space
(``tests.fakes.tiff_mutations.ReadWorker``): every mutant must end as a raster or a typed ``TerradaptError``, within
the deadline, with the child's peak RSS during each read (``VmHWM``, reset before the read) within a budget set
by the spec's own limits. Measuring in a child keeps the measure honest (this process's peak RSS is already high
from other tests and would hide a big allocation) and keeps a runaway allocation from taking the machine down.

Headers that declare huge rasters (100000 x 100000 pixels, thousands of megabytes once decoded, blocks far larger
than the image) are refused from the header, without decoding: their peak RSS is measured in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from terradapt.errors import CorruptTileError, InvalidTileError, OversizedTileError, TerradaptError
from terradapt.raster import Raster, RasterSpec, raster_to_geotiff_bytes, read_raster
from tests.conftest import examples
from tests.fakes.flair_tiles import write_tile
from tests.fakes.tiff_mutations import Mutant, ReadWorker, base_tiles, describe, mutants

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]

#: the worker's contract with smaller size limits, so the memory budget of a read is tight enough to mean something
SMALL_FLAIR: dict[str, Any] = {
    "band_count": 5,
    "expected_crs": "EPSG:2154",
    "drivers": ["GTiff"],
    "max_pixels": 1_000_000,
    "max_decoded_bytes": 16 << 20,
}
#: the delayed-label mask contract (one band, any CRS, nodata everywhere allowed), same limits
SMALL_MASK: dict[str, Any] = {
    "band_count": 1,
    "require_crs": False,
    "max_nodata_fraction": 1.0,
    "max_pixels": 1_000_000,
    "max_decoded_bytes": 16 << 20,
}
#: peak RSS a read may add: the decoded array, GDAL's block cache holding as much again, numpy temporaries
PEAK_BUDGET = 4 * (16 << 20) + (64 << 20)


def sparse_tiff(width: int, height: int, count: int, block: int) -> bytes:
    """A valid tiled GeoTIFF that declares ``width`` x ``height`` pixels but stores no block (GDAL SPARSE_OK)."""
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": "uint8",
        "crs": "EPSG:2154",
        "transform": Affine(0.2, 0.0, 417_000.0, 0.0, -0.2, 6_425_000.0),
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "SPARSE_OK": True,
    }
    with MemoryFile() as mem:
        with mem.open(**profile):
            pass
        return bytes(mem.read())


#: what each huge header declares, and the check that refuses it
HUGE = {
    "100000x100000": ((100_000, 100_000, 5, 1024), "pixels", RasterSpec.flair()),
    "8000x8000x20-bands": ((8000, 8000, 20, 512), "decoded_bytes", RasterSpec(band_count=None)),
    "64x64-in-16384-blocks": ((64, 64, 5, 16384), "block_bytes", RasterSpec.flair()),
}

_MEASURE = """
import json, sys
from terradapt.raster import RasterSpec, read_raster
from terradapt.errors import TerradaptError
from tests.fakes.tiff_mutations import base_tiles, memory_bytes, reset_peak
spec = RasterSpec(**json.loads(sys.argv[2]))
read_raster(base_tiles()["strips"], RasterSpec.flair())  # GDAL warmed up: what follows is the read alone
data = open(sys.argv[1], "rb").read()
reset_peak()
before = memory_bytes("VmRSS")
try:
    read_raster(data, spec)
    out = {"error": None}
except TerradaptError as exc:
    out = {"error": type(exc).__name__, "field": getattr(exc, "field", None), "message": str(exc)}
out["growth_kb"] = (memory_bytes("VmHWM") - before) // 1024
print(json.dumps(out))
"""


def _measure_read(data: bytes, spec: RasterSpec, tmp_path: Path) -> dict[str, Any]:
    """Read ``data`` in a fresh, warmed-up process: the error it ended with and its peak RSS growth (kB)."""
    path = tmp_path / "tile.tif"
    path.write_bytes(data)
    fields = {"band_count": spec.band_count, "expected_crs": spec.expected_crs, "drivers": list(spec.drivers)}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), json.dumps(fields)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("name", sorted(HUGE))
def test_a_small_file_declaring_a_huge_raster_is_refused_from_its_header(name: str, tmp_path: Path) -> None:
    (width, height, count, block), field, spec = HUGE[name]
    data = sparse_tiff(width, height, count, block)
    assert len(data) < 100_000  # a small upload...
    with pytest.raises(OversizedTileError) as info:
        read_raster(data, spec)
    assert info.value.field == field and info.value.reason == "oversized_tile"
    assert f"{height}x{width}" in str(info.value) or f"{block}x{block}" in str(info.value)
    # ... refused without decoding: a fresh process's peak RSS barely moves (the raster would be gigabytes)
    out = _measure_read(data, spec, tmp_path)
    assert out["error"] == "OversizedTileError" and out["field"] == field, out
    assert int(out["growth_kb"]) < 16 * 1024, out  # < 16 MiB, for a raster of 320 MB to 50 GB once decoded


def _big_tile() -> bytes:
    """An accepted 3000 x 3000 x 5 tile, 45 MB decoded (a pattern: deflate makes the file small)."""
    rows, cols = np.indices((3000, 3000))
    pattern = np.stack([(rows + cols * (b + 1)) % 251 + 1 for b in range(5)]).astype(np.uint8)
    data = raster_to_geotiff_bytes(Raster(pattern, "EPSG:2154", Affine(0.2, 0.0, 417_000.0, 0.0, -0.2, 6_425_000.0)))
    assert len(data) < 5_000_000
    return data


def test_the_peak_rss_measure_sees_a_decode(tmp_path: Path) -> None:
    # the control of the test above: the same measure sees the 45 MB an accepted big tile costs
    out = _measure_read(_big_tile(), RasterSpec.flair(), tmp_path)
    assert out["error"] is None and int(out["growth_kb"]) > 40 * 1024, out


def test_the_read_worker_sees_a_big_decode_and_caps_it() -> None:
    # the controls of the fuzz tests below: their child measures each read's peak, and its address-space budget
    # turns an allocation beyond it into an "oom" outcome (which those tests refuse)
    data = _big_tile()
    roomy = ReadWorker({"band_count": 5, "expected_crs": "EPSG:2154"})
    tight = ReadWorker({"band_count": 5, "expected_crs": "EPSG:2154"}, budget=16 << 20)
    try:
        seen = roomy.read(data)
        assert seen.outcome == "ok" and seen.peak_growth > 40 << 20, describe(seen)
        assert tight.read(data).outcome == "oom"
    finally:
        roomy.close()
        tight.close()


def test_a_vrt_payload_cannot_make_the_worker_read_a_local_file(tmp_path: Path) -> None:
    # GDAL opens a VRT from bytes as readily as a GeoTIFF; a VRT names other files (or URLs) to read
    secret = write_tile(tmp_path / "secret.tif")
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{i}"><SimpleSource><SourceFilename>{secret}</SourceFilename>'
        f"<SourceBand>{i}</SourceBand></SimpleSource></VRTRasterBand>"
        for i in range(1, 6)
    )
    vrt = (
        '<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>EPSG:2154</SRS>'
        f"<GeoTransform>417000,0.2,0,6425000,0,-0.2</GeoTransform>{bands}</VRTDataset>"
    ).encode()
    for spec in (RasterSpec.flair(), RasterSpec(band_count=5)):
        with pytest.raises(CorruptTileError, match="cannot open as GTiff"):
            read_raster(vrt, spec)
    # a path is opened by whichever driver knows it, then refused before any pixel is read
    path = tmp_path / "tile.vrt"
    path.write_bytes(vrt)
    with pytest.raises(InvalidTileError, match=r"format='VRT'; accepted: GTiff") as info:
        read_raster(path, RasterSpec.flair())
    assert info.value.reason == "corrupt_tile"


@pytest.fixture(scope="module")
def flair_reader():
    worker = ReadWorker(SMALL_FLAIR)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def mask_reader():
    worker = ReadWorker(SMALL_MASK)
    yield worker
    worker.close()


def _check(worker: ReadWorker, mutant: Mutant) -> None:
    result = worker.read(mutant.data)
    assert result.outcome in ("ok", "typed"), f"{mutant}: {describe(result)}"
    assert result.peak_growth <= PEAK_BUDGET, f"{mutant}: {describe(result)}"


@settings(max_examples=examples(500))
@given(mutant=mutants())
def test_mutated_tiles_end_as_a_raster_or_a_typed_error_in_bounded_memory(flair_reader, mutant: Mutant) -> None:
    _check(flair_reader, mutant)


@settings(max_examples=examples(200))
@given(mutant=mutants())
def test_mutated_tiles_read_as_label_masks_end_as_a_raster_or_a_typed_error(mask_reader, mutant: Mutant) -> None:
    _check(mask_reader, mutant)


@settings(max_examples=examples(100))
@given(mutant=mutants(max_steps=2))
def test_mutated_tiles_in_process_raise_only_typed_errors(mutant: Mutant) -> None:
    # the same path without the child (what the worker process itself runs): any other exception fails here
    try:
        raster = read_raster(mutant.data, RasterSpec(**{**SMALL_FLAIR, "drivers": ("GTiff",)}))
    except TerradaptError:
        return
    assert raster.data.shape[0] == 5 and raster.data.dtype == np.uint8


@settings(max_examples=examples(40))
@given(
    bands=st.integers(1, 6),
    height=st.integers(32, 80),
    width=st.integers(32, 80),
    seed=st.integers(0, 2**32 - 1),
    nodata=st.sampled_from([None, 0.0, 255.0]),
)
def test_any_valid_raster_round_trips(bands: int, height: int, width: int, seed: int, nodata: float | None) -> None:
    data = np.random.default_rng(seed).integers(1, 255, size=(bands, height, width), dtype=np.uint8)
    raster = Raster(data, "EPSG:2154", Affine(0.2, 0.0, 417_000.0, 0.0, -0.2, 6_425_000.0), nodata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)
        back = read_raster(raster_to_geotiff_bytes(raster), RasterSpec(band_count=bands, expected_crs="EPSG:2154"))
    np.testing.assert_array_equal(back.data, data)
    assert back.crs == "EPSG:2154" and back.transform == raster.transform and back.nodata == nodata


def test_the_base_tiles_are_valid_worker_input() -> None:
    for name, data in base_tiles().items():
        raster = read_raster(data, RasterSpec.flair())
        assert raster.data.shape == (5, 64, 64), name
