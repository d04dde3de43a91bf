from datetime import UTC, datetime

import pytest

from terradapt.errors import InvalidPayloadError
from terradapt.records import (
    Acquisition,
    AdaptationJob,
    DeadLetter,
    DriftEvent,
    FeatureStats,
    ModelVersion,
    RolloutEvent,
    RolloutStep,
    TilePrediction,
    parse_record,
)

ACQ = Acquisition(
    id="D033-000001",
    region="D033",
    datetime=datetime(2024, 6, 1, tzinfo=UTC),
    bbox=(400000.0, 6400000.0, 400102.4, 6400102.4),
    href="s3://terradapt-acquisitions/D033/D033-000001.tif",
    sha256="ab" * 32,
)
DRIFT = DriftEvent(region="D013", acquisition_id="a", tiles_seen=9, signal="radiometry", score=9.0, threshold=2.0)


def test_acquisition_round_trips_through_stac_json():
    payload = ACQ.to_json()
    back = Acquisition.from_stac(payload)
    assert back == ACQ
    item = ACQ.to_stac()
    assert item.assets["data"].href == ACQ.href
    assert item.properties["terradapt:region"] == "D033"


@pytest.mark.parametrize(
    "record",
    [
        TilePrediction(
            acquisition_id="a",
            region="D033",
            model_version=0,
            class_shares=(0.5, 0.5),
            mean_entropy=0.3,
            latency_s=0.01,
        ),
        FeatureStats(
            acquisition_id="a",
            region="D033",
            model_version=1,
            band_mean=(0.1,),
            band_std=(0.2,),
            residual_mean=(0.0,),
            residual_std=(0.1,),
            deep_mean=(1.0, 2.0),
            bn_mean_shift=0.1,
            bn_var_ratio=0.2,
            class_shares=(1.0,),
            mean_entropy=0.1,
            mean_confidence=0.9,
        ),
        DRIFT,
        AdaptationJob(job_id="j", region="D013", base_version=0, method="bn", tile_ids=("a", "b"), trigger=DRIFT),
        ModelVersion(region="D013", version=1, parent=0, method="bn", sha256="00" * 32, href="file:///x"),
        RolloutEvent(region="D013", version=1, step=RolloutStep.PROMOTED, previous=0),
        DeadLetter(topic="acquisitions", reason="corrupt_tile", error="bad", payload="{}"),
    ],
    ids=lambda r: type(r).__name__,
)
def test_records_round_trip_json(record):
    assert parse_record(type(record), record.to_json()) == record


def test_unknown_keys_and_bad_region_are_rejected():
    with pytest.raises(InvalidPayloadError, match="extra"):
        parse_record(DriftEvent, {**DRIFT.model_dump(mode="json"), "surprise": 1})
    with pytest.raises(ValueError, match="D0NN"):
        Acquisition(**{**ACQ.model_dump(), "region": "Gironde"})


def test_malformed_json_and_future_schema_are_rejected():
    with pytest.raises(InvalidPayloadError):
        parse_record(DriftEvent, b"{not json")
    with pytest.raises(InvalidPayloadError, match="schema_version"):
        parse_record(DriftEvent, {**DRIFT.model_dump(mode="json"), "schema_version": 99})
    with pytest.raises(InvalidPayloadError, match="STAC"):
        Acquisition.from_stac(b"[1, 2]")
