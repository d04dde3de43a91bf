"""Fuzzing the record parsers: any payload ends as a valid record or an InvalidPayloadError, never anything else.

What the workers parse first on every message: STAC Items (acquisitions), label records, adaptation jobs. Inputs
are valid documents with fields broken at any depth, any JSON, any bytes and deep nesting; valid records are
generated too, and must survive their own wire form unchanged.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from terradapt.errors import InvalidPayloadError
from terradapt.records import ID_PATTERN, Acquisition, AdaptationJob, DriftEvent, LabelRecord, parse_record
from tests.conftest import examples
from tests.fakes.payloads import payloads

pytestmark = pytest.mark.fuzz

WHEN = datetime(2024, 6, 1, tzinfo=UTC)
ACQ = Acquisition(
    id="D033-00001",
    region="D033",
    datetime=WHEN,
    bbox=(400000.0, 6400000.0, 400012.8, 6400012.8),
    href="memory://acquisitions/D033/D033-00001.tif",
    sha256="ab" * 32,
)
DRIFT = DriftEvent(
    region="D013", acquisition_id="D013-00003", tiles_seen=4, signal="radiometry", score=9.0, threshold=2.0
)
JOB = AdaptationJob(
    job_id="adapt-D013-00003",
    region="D013",
    base_version=0,
    method="bn",
    tile_ids=("D013-00002", "D013-00003"),
    tile_hrefs=("memory://acquisitions/D013/D013-00002.tif", "memory://acquisitions/D013/D013-00003.tif"),
    trigger=DRIFT,
    label_shift=(0.5, 0.5),
    labels=("D013-00001",),
)
LABEL = LabelRecord(acquisition_id="D033-00001", region="D033", href="memory://acquisitions/D033/labels/1.tif")

regions = st.one_of(
    st.from_regex(r"D0[0-9]{2}", fullmatch=True),
    st.sampled_from(["D02A", "D02B"]),
    st.from_regex(r"[a-z]{1,8}-[0-9]{1,3}", fullmatch=True),
)
ids = st.from_regex(ID_PATTERN, fullmatch=True)
texts = st.text(min_size=1, max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))])


def _ends_as_record_or_typed_error(parse, payload: bytes) -> None:
    error: InvalidPayloadError | None = None
    try:
        parse(payload)
    except InvalidPayloadError as exc:  # anything else escapes and fails the test
        error = exc
    assert error is None or (error.reason == "malformed_payload" and str(error))


@settings(max_examples=examples(300))
@given(payload=payloads(json.loads(ACQ.to_json())))
def test_any_stac_payload_is_an_acquisition_or_invalid_payload(payload: bytes) -> None:
    _ends_as_record_or_typed_error(Acquisition.from_stac, payload)


@settings(max_examples=examples(200))
@given(payload=payloads(json.loads(LABEL.to_json())))
def test_any_label_payload_is_a_label_record_or_invalid_payload(payload: bytes) -> None:
    _ends_as_record_or_typed_error(lambda p: parse_record(LabelRecord, p), payload)


@settings(max_examples=examples(200))
@given(payload=payloads(json.loads(JOB.to_json())))
def test_any_job_payload_is_an_adaptation_job_or_invalid_payload(payload: bytes) -> None:
    _ends_as_record_or_typed_error(lambda p: parse_record(AdaptationJob, p), payload)


@settings(max_examples=examples(100))
@given(
    acq=st.builds(
        Acquisition,
        id=ids,
        region=regions,
        datetime=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=zones),
        bbox=st.tuples(finite, finite, finite, finite),
        crs=st.one_of(st.none(), st.sampled_from(["EPSG:2154", "EPSG:4326"])),
        sensor=texts,
        bands=st.lists(texts, max_size=6).map(tuple),
        href=texts,
        sha256=st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)),
    )
)
def test_any_acquisition_survives_its_stac_json(acq: Acquisition) -> None:
    assert Acquisition.from_stac(acq.to_json()) == acq
    assert Acquisition.from_stac(acq.to_stac()) == acq


@settings(max_examples=examples(100))
@given(
    job=st.builds(
        AdaptationJob,
        job_id=ids,
        region=regions,
        base_version=st.integers(0, 2**31),
        method=texts,
        tile_ids=st.lists(ids, max_size=4).map(tuple),
        tile_hrefs=st.lists(texts, max_size=4).map(tuple),
        trigger=st.builds(
            DriftEvent,
            region=regions,
            acquisition_id=ids,
            tiles_seen=st.integers(0, 10**6),
            signal=texts,
            score=finite,
            threshold=finite,
            scores=st.dictionaries(texts, finite, max_size=3),
        ),
        label_shift=st.one_of(st.none(), st.lists(finite, max_size=13).map(tuple)),
        labels=st.lists(ids, max_size=3).map(tuple),
    ),
    label=st.builds(LabelRecord, acquisition_id=ids, region=regions, href=texts),
)
def test_any_job_and_label_survive_their_json(job: AdaptationJob, label: LabelRecord) -> None:
    assert parse_record(AdaptationJob, job.to_json()) == job
    assert parse_record(LabelRecord, label.to_json()) == label


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "../../etc/cron.d/x"), ("id", "a/b"), ("id", ".hidden"), ("id", ""), ("region", "../D033")],
)
def test_ids_and_regions_that_would_escape_an_object_key_are_refused(field: str, value: str) -> None:
    # found by fuzzing the worker with a file-system prediction store: ids become keys "<region>/<id>.tif"
    document = json.loads(ACQ.to_json())
    if field == "id":
        document["id"] = value
    else:
        document["properties"]["terradapt:region"] = value
    with pytest.raises(InvalidPayloadError, match=field):
        Acquisition.from_stac(json.dumps(document))
    with pytest.raises(InvalidPayloadError, match="acquisition_id"):
        parse_record(LabelRecord, {**LABEL.model_dump(mode="json"), "acquisition_id": "a/../../b"})


def _stac(**changes: object) -> bytes:
    document = json.loads(ACQ.to_json())
    for key, value in changes.items():
        if key in ("schema_version", "region"):
            document["properties"][f"terradapt:{key}"] = value
        elif key == "eo_bands":
            document["assets"]["data"]["eo:bands"] = value
        elif key == "datetime":
            del document["properties"]["datetime"]
        else:
            document[key] = value
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        (b"[" * 50_000 + b"]" * 50_000, "not JSON"),  # RecursionError
        (b'{"type": "Feature", "id": "x", "properties": [], "assets": {}}', "properties"),  # pystac STACTypeError
        (_stac(type="Collection"), "type"),  # pystac STACTypeError
        (_stac(schema_version=None), "schema_version"),  # TypeError from int(None)
        (_stac(eo_bands=[{}]), "eo:bands"),  # KeyError 'name'
        (_stac(datetime=None), "datetime"),  # pystac STACError
        (_stac(bbox=7), "bbox"),  # TypeError: 'int' object is not iterable
        (_stac(bbox=[0, 0, 1e400, 1]), "bbox"),  # accepted before: an infinite bbox, written back as Infinity
    ],
    ids=[
        "deep-nesting",
        "properties-list",
        "not-a-feature",
        "schema-version-null",
        "band-without-name",
        "no-datetime",
        "bbox-number",
        "bbox-infinite",
    ],
)
def test_stac_payloads_that_used_to_escape_as_other_exceptions(payload: bytes, names: str) -> None:
    # found by the fuzz tests above: each one escaped Acquisition.from_stac as the exception in its comment
    with pytest.raises(InvalidPayloadError, match=names):
        Acquisition.from_stac(payload)
