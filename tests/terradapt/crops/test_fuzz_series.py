"""Fuzzing the crop edges: any series item ends as a record or an InvalidPayloadError, any array file as a series or
an InvalidSeriesError (never anything else, so a worker can always dead-letter it with a reason)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from terradapt.crops.records import SeriesAcquisition, series_acquisition
from terradapt.crops.series import decode_series, encode_series
from terradapt.crops.synthetic import COUNTRIES, generate_country
from terradapt.errors import InvalidPayloadError, InvalidSeriesError
from tests.conftest import examples
from tests.fakes.payloads import payloads

pytestmark = pytest.mark.fuzz

_PARCEL = generate_country(COUNTRIES["dk-1"], 1, seed=0)[0]
_DATA = encode_series(_PARCEL)
_ITEM = series_acquisition(_PARCEL, href="memory://objects/dk-1/P000000.npz", data=_DATA, country="DK")


def _ends_as_series_or_invalid(data: bytes) -> None:
    error: InvalidSeriesError | None = None
    try:
        decode_series(data)
    except InvalidSeriesError as exc:  # anything else escapes and fails the test
        error = exc
    assert error is None or str(error)


@settings(max_examples=examples(200))
@given(payload=payloads(json.loads(_ITEM.to_json())))
def test_any_series_item_is_a_record_or_invalid_payload(payload: bytes) -> None:
    error: InvalidPayloadError | None = None
    try:
        record = SeriesAcquisition.from_stac(payload)
    except InvalidPayloadError as exc:  # anything else escapes and fails the test
        error = exc
    if error is not None:
        assert error.reason == "malformed_payload" and str(error)
        return
    assert SeriesAcquisition.from_stac(record.to_json()) == record


@settings(max_examples=examples(100))
@given(cut=st.integers(0, len(_DATA)), flip=st.integers(0, len(_DATA) - 1), byte=st.integers(0, 255))
def test_any_corrupted_array_file_is_a_series_or_invalid_series(cut: int, flip: int, byte: int) -> None:
    data = bytearray(_DATA[:cut] if cut < len(_DATA) else _DATA)
    if data and flip < len(data):
        data[flip] = byte
    _ends_as_series_or_invalid(bytes(data))


@settings(max_examples=examples(60))
@given(
    shape=st.tuples(st.integers(0, 4), st.integers(0, 12), st.integers(0, 4)),
    dtype=st.sampled_from(["float32", "float64", "int16", "uint8", "bool"]),
    days=st.lists(st.integers(-5, 400), min_size=0, max_size=5),
    extra=st.booleans(),
)
def test_arbitrary_arrays_in_the_file_are_a_series_or_invalid_series(shape, dtype, days, extra) -> None:
    buffer = io.BytesIO()
    arrays = {
        "values": np.ones(shape, dtype=dtype),
        "days": np.asarray(days, dtype=np.int64),
        "cloud": np.zeros(shape[::2], dtype=bool),
        "label": np.asarray(1, dtype=np.int64),
    }
    if extra:
        arrays["other"] = np.zeros(2)
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    _ends_as_series_or_invalid(buffer.getvalue())
