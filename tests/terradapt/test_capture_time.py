"""Capture times come from the data (TIFF tag, FLAIR metadata, a CSV, an option), never from the clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from terradapt.capture_time import CaptureTimes, csv_times, flair_metadata_times, parse_datetime, tiff_datetime
from terradapt.errors import UnknownCaptureTimeError
from terradapt.raster import Raster, raster_to_geotiff_bytes

WHEN = datetime(2021, 6, 14, 10, 22, tzinfo=UTC)


def _tile(path: Path, tag: str | None = None) -> bytes:
    data = raster_to_geotiff_bytes(
        Raster(np.full((5, 32, 32), 80, np.uint8), "EPSG:2154", Affine(0.2, 0, 400_000, 0, -0.2, 6_400_000))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if tag is not None:
        with rasterio.open(path, "r+") as dst:
            dst.update_tags(TIFFTAG_DATETIME=tag)
    return path.read_bytes()


def test_tiff_datetime_tag(tmp_path: Path):
    assert tiff_datetime(_tile(tmp_path / "a.tif", "2021:06:14 10:22:00")) == WHEN
    assert tiff_datetime(_tile(tmp_path / "b.tif")) is None
    assert tiff_datetime(_tile(tmp_path / "c.tif", "0000:00:00 00:00:00")) is None
    assert tiff_datetime(b"not a tiff") is None


def test_flair_metadata_beside_the_tiles(tmp_path: Path):
    root = tmp_path / "flair"
    (root / "flair-1_metadata_aerial.json").parent.mkdir(parents=True)
    (root / "flair-1_metadata_aerial.json").write_text(
        json.dumps(
            {
                "IMG_000001": {"date": "2021-06-14", "time": "10h22", "camera": "UCE-M3-f120-s06"},
                "IMG_000002": {"camera": "no date"},
            }
        )
    )
    path = root / "D033_2021" / "Z1_UA" / "img" / "IMG_000001.tif"
    data = _tile(path, "2000:01:01 00:00:00")  # the metadata wins over the tag
    times = CaptureTimes()
    assert times.resolve(path, data).model_dump() == {
        "datetime": WHEN,
        "start": None,
        "end": None,
        "source": "flair-metadata",
    }
    assert flair_metadata_times(root / "flair-1_metadata_aerial.json") == {"IMG_000001": WHEN}
    undated = root / "D033_2021" / "Z1_UA" / "img" / "IMG_000002.tif"
    assert times.resolve(undated, _tile(undated)).source == "unknown"


def test_csv_and_option_take_precedence(tmp_path: Path):
    table = tmp_path / "times.csv"
    table.write_text("id,datetime\nIMG_000001,2021-06-14T10:22:00Z\nother.tif,2020-01-01\n")
    path = tmp_path / "IMG_000001.tif"
    data = _tile(path, "2000:01:01 00:00:00")
    assert csv_times(table)["other.tif"] == datetime(2020, 1, 1, tzinfo=UTC)
    by_csv = CaptureTimes(table=csv_times(table)).resolve(path, data)
    assert (by_csv.datetime, by_csv.source) == (WHEN, "csv")
    fixed = datetime(2019, 5, 1, tzinfo=UTC)
    by_option = CaptureTimes(fixed=fixed, table=csv_times(table)).resolve(path, data)
    assert (by_option.datetime, by_option.source) == (fixed, "option")
    by_tag = CaptureTimes().resolve(path, data)
    assert (by_tag.datetime, by_tag.source) == (datetime(2000, 1, 1, tzinfo=UTC), "tiff-tag")


def test_bad_csv_rows_name_the_line(tmp_path: Path):
    table = tmp_path / "times.csv"
    table.write_text("IMG_1,2021-06-14\nIMG_2,yesterday\n")
    with pytest.raises(ValueError, match=r"times.csv:2 datetime='yesterday'"):
        csv_times(table)


def test_unknown_time_is_bounded_by_the_campaign_or_refused_when_required(tmp_path: Path):
    path = tmp_path / "x.tif"
    data = _tile(path)
    start, end = parse_datetime("2021-04-01"), parse_datetime("2021-09-30T00:00:00+00:00")
    bounded = CaptureTimes(campaign_start=start, campaign_end=end, require=True).resolve(path, data)
    assert (bounded.datetime, bounded.start, bounded.end, bounded.known) == (None, start, end, False)
    with pytest.raises(UnknownCaptureTimeError, match=r"capture time of x\.tif unknown"):
        CaptureTimes(require=True).resolve(path, data)
