import io
import json
from datetime import date

import numpy as np
import pytest

from serving.store import MemoryStore
from terradapt.crops.records import SeriesAcquisition, series_acquisition
from terradapt.crops.series import S2_BANDS, ParcelSeries, SeriesSpec, decode_series, encode_series, validate_series
from terradapt.crops.synthetic import COUNTRIES, generate_country
from terradapt.errors import ChecksumMismatchError, InvalidPayloadError, InvalidSeriesError


def _series(t=5, c=10, s=3, values=None, dates=None, cloud=None) -> ParcelSeries:
    return ParcelSeries(
        values=np.full((t, c, s), 0.2, dtype=np.float32) if values is None else values,
        dates=np.datetime64("2021-03-01", "D") + np.arange(t) * 10 if dates is None else dates,
        cloud=np.zeros((t, s), dtype=bool) if cloud is None else cloud,
        label=2,
        parcel_id="P1",
        region="fr-1",
    )


def _days(*iso: str) -> np.ndarray:
    return np.array(iso, dtype="datetime64[D]")


_NAN_40 = np.where(np.arange(5)[:, None, None] < 2, np.nan, 0.2).astype(np.float32) * np.ones((5, 10, 3), np.float32)


def test_valid_series_round_trips_through_npz_without_pickle():
    series = generate_country(COUNTRIES["dk-1"], 1, seed=3)[0]
    data = encode_series(series)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["cloud", "days", "label", "values"]
        assert all(npz[k].dtype != object for k in npz.files)
    back = decode_series(data, parcel_id=series.parcel_id, region=series.region)
    np.testing.assert_array_equal(back.values, series.values)
    np.testing.assert_array_equal(back.dates, series.dates)
    np.testing.assert_array_equal(back.cloud, series.cloud)
    assert back.label == series.label
    assert back.day_of_year()[0] == 30  # dk-1's calendar starts on day 30


@pytest.mark.parametrize(
    ("series", "reason", "field"),
    [
        (
            _series(dates=_days("2021-03-01", "2021-03-11", "2021-03-11", "2021-04-01", "2021-05-01")),
            "dates_not_increasing",
            "dates",
        ),
        (
            _series(dates=_days("2021-05-01", "2021-03-11", "2021-03-21", "2021-04-01", "2021-05-02")),
            "dates_not_increasing",
            "dates",
        ),
        (_series(c=13), "wrong_band_count", "bands"),
        (_series(values=_NAN_40), "nan_share", "values"),
        (_series(cloud=np.zeros((5, 2), dtype=bool)), "invalid_series", "cloud"),
        (_series(t=1), "invalid_series", "dates"),
        (_series(values=np.full((5, 10, 3), np.inf, dtype=np.float32)), "invalid_series", "values"),
    ],
    ids=["repeated-date", "decreasing-date", "13-bands", "40pct-nan", "cloud-shape", "one-date", "inf"],
)
def test_invalid_series_raise_typed_errors_naming_the_field(series, reason, field):
    with pytest.raises(InvalidSeriesError) as info:
        validate_series(series)
    assert info.value.reason == reason
    assert info.value.field == field
    assert "accepted" in str(info.value)


def test_nan_share_below_the_limit_is_accepted():
    values = np.full((5, 10, 3), 0.2, dtype=np.float32)
    values[0, 0, 0] = np.nan
    validate_series(_series(values=values), SeriesSpec(max_nan_share=0.01))


def test_npz_with_a_pickled_object_array_is_refused():
    buffer = io.BytesIO()
    np.savez(buffer, values=np.array([{"a": 1}], dtype=object), days=np.arange(2), cloud=np.zeros(2), label=np.int64(1))
    with pytest.raises(InvalidSeriesError, match="file"):
        decode_series(buffer.getvalue())


def test_garbage_bytes_are_an_invalid_series():
    with pytest.raises(InvalidSeriesError) as info:
        decode_series(b"not an npz")
    assert info.value.reason == "invalid_series"


def test_series_acquisition_is_a_stac_item_with_a_time_dimension_and_reads_back_from_storage():
    series = generate_country(COUNTRIES["si-1"], 1, seed=0)[0]
    store = MemoryStore()
    data = encode_series(series)
    href = store.put(f"{series.region}/{series.parcel_id}.npz", data, "application/x-npz")
    record = series_acquisition(series, href=href, data=data, country="SI")
    item = json.loads(record.to_json())
    assert item["properties"]["datetime"] is None
    assert item["properties"]["start_datetime"].startswith("2021-01-10")
    cube = item["properties"]["cube:dimensions"]
    assert cube["time"]["type"] == "temporal" and len(cube["time"]["values"]) == series.num_dates
    assert cube["bands"]["values"] == list(S2_BANDS)
    assert item["assets"]["data"]["file:checksum"] == record.sha256
    back = SeriesAcquisition.from_stac(record.to_json())
    assert back == record
    read = back.read(store.get(f"{series.region}/{series.parcel_id}.npz"))
    np.testing.assert_array_equal(read.values, series.values)


def test_series_acquisition_rejects_tampered_bytes_and_mismatched_dates():
    series = _series()
    data = encode_series(series)
    record = series_acquisition(series, href="memory://objects/fr-1/P1.npz", data=data, country="FR")
    with pytest.raises(ChecksumMismatchError):
        record.read(data + b"x")
    other = record.model_copy(update={"sha256": None, "dates": (date(2020, 1, 1), date(2020, 2, 1))})
    with pytest.raises(InvalidSeriesError, match="dates"):
        other.read(data)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda item: item["properties"]["cube:dimensions"]["time"].update(values=["2021-03-02", "2021-03-01"]),
            "incr",
        ),
        (lambda item: item["properties"].pop("cube:dimensions"), "cube:dimensions"),
        (lambda item: item["properties"].update({"terradapt:region": "Not A Region"}), "region"),
        (lambda item: item["properties"].update({"terradapt:country": "france"}), "country"),
        (lambda item: item.update(assets={}), "data"),
    ],
    ids=["dates-not-increasing", "no-time-dimension", "bad-region", "bad-country", "no-asset"],
)
def test_bad_series_items_raise_invalid_payload(mutate, match):
    record = series_acquisition(_series(), href="memory://x/P1.npz", data=b"x", country="FR")
    item = json.loads(record.to_json())
    mutate(item)
    with pytest.raises(InvalidPayloadError, match=match):
        SeriesAcquisition.from_stac(item)
