"""Typed records passed between the stages of one acquisition's flow.

One record per hop, defined once and shared by the embedded runner and the Kafka workers::

    Acquisition -> TilePrediction -> FeatureStats -> DriftEvent -> AdaptationJob -> ModelVersion -> RolloutEvent

Every record is a frozen pydantic model that rejects unknown fields and carries ``schema_version``, so a
consumer can refuse payloads from a future producer instead of misreading them. ``Acquisition`` travels as a
STAC Item (see :meth:`Acquisition.to_stac`).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

import pystac
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from terradapt.errors import InvalidPayloadError

SCHEMA_VERSION = 1

#: FLAIR-style departement codes (D001..D095, D02A, D02B) or dataset areas such as "dubai-3" / "synth-1".
REGION_PATTERN = re.compile(r"^(D0[0-9]{2}|D02[AB]|[a-z]+-[0-9]+)$")

_STAC_EXTENSION_PREFIX = "terradapt:"


def utcnow() -> datetime:
    """Timezone-aware current time (records never carry naive datetimes)."""
    return datetime.now(UTC)


def check_region(region: str) -> str:
    """Validate a region code; raise ValueError naming the accepted forms."""
    if not REGION_PATTERN.match(region):
        raise ValueError(
            f"region {region!r} is not a region code: expected 'D0NN' (FLAIR departement, e.g. 'D033') "
            "or '<area>-<n>' (e.g. 'dubai-3')"
        )
    return region


class Record(BaseModel):
    """Base of every record: frozen, strict about unknown keys, JSON round-trippable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(f"schema_version={value} is newer than this reader ({SCHEMA_VERSION})")
        return value

    def to_json(self) -> bytes:
        """Serialize to UTF-8 JSON bytes (the Kafka payload)."""
        return self.model_dump_json().encode()


R = TypeVar("R", bound=Record)


def parse_record(cls: type[R], payload: bytes | str | dict[str, Any]) -> R:
    """Parse a payload into a record, raising InvalidPayloadError with the reason on any problem."""
    try:
        if isinstance(payload, dict):
            return cls.model_validate(payload)
        return cls.model_validate_json(payload)
    except ValidationError as exc:
        raise InvalidPayloadError(f"payload is not a valid {cls.__name__}: {exc.errors()[:3]}") from exc


class Acquisition(Record):
    """One newly acquired tile: a STAC Item whose single data asset is a GeoTIFF in storage."""

    id: str = Field(min_length=1, max_length=200)
    region: str
    datetime: datetime
    bbox: tuple[float, float, float, float]
    crs: str | None = "EPSG:2154"
    sensor: str = "aerial-vhr"
    bands: tuple[str, ...] = ("red", "green", "blue", "nir", "elevation")
    href: str = Field(min_length=1)
    sha256: str | None = None

    @field_validator("region")
    @classmethod
    def _valid_region(cls, value: str) -> str:
        return check_region(value)

    def to_stac(self) -> pystac.Item:
        """Build the STAC Item (bbox in the tile CRS is kept as a property; geometry in that CRS)."""
        x0, y0, x1, y1 = self.bbox
        geometry = {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
        item = pystac.Item(
            id=self.id,
            geometry=geometry,
            bbox=list(self.bbox),
            datetime=self.datetime,
            properties={
                f"{_STAC_EXTENSION_PREFIX}region": self.region,
                f"{_STAC_EXTENSION_PREFIX}schema_version": self.schema_version,
                "proj:code": self.crs,
                "constellation": self.sensor,
            },
        )
        extra: dict[str, Any] = {"eo:bands": [{"name": b} for b in self.bands]}
        if self.sha256:
            extra["file:checksum"] = self.sha256
        item.add_asset(
            "data",
            pystac.Asset(href=self.href, media_type=pystac.MediaType.GEOTIFF, roles=["data"], extra_fields=extra),
        )
        return item

    def to_json(self) -> bytes:
        """Serialize as STAC Item JSON: what travels on the acquisitions topic."""
        return json.dumps(self.to_stac().to_dict(include_self_link=False)).encode()

    @classmethod
    def from_stac(cls, item: pystac.Item | dict[str, Any] | bytes | str) -> Acquisition:
        """Parse a STAC Item (object, dict or JSON); raise InvalidPayloadError when it is not one of ours."""
        try:
            if isinstance(item, (bytes, str)):
                item = json.loads(item)
            if isinstance(item, dict):
                item = pystac.Item.from_dict(item)
            if not isinstance(item, pystac.Item):
                raise TypeError(f"expected a JSON object, got {type(item).__name__}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidPayloadError(f"payload is not a STAC Item: {exc}") from exc
        props = item.properties
        asset = item.assets.get("data")
        if asset is None:
            raise InvalidPayloadError("STAC Item has no 'data' asset")
        try:
            return cls(
                schema_version=int(props.get(f"{_STAC_EXTENSION_PREFIX}schema_version", SCHEMA_VERSION)),
                id=item.id,
                region=str(props.get(f"{_STAC_EXTENSION_PREFIX}region", "")),
                datetime=item.datetime or utcnow(),
                bbox=tuple(item.bbox or (0.0, 0.0, 0.0, 0.0)),  # type: ignore[arg-type]
                crs=props.get("proj:code"),
                sensor=str(props.get("constellation", "aerial-vhr")),
                bands=tuple(b["name"] for b in asset.extra_fields.get("eo:bands", [])),
                href=asset.href,
                sha256=asset.extra_fields.get("file:checksum"),
            )
        except ValidationError as exc:
            raise InvalidPayloadError(f"STAC Item is not a valid acquisition: {exc.errors()[:3]}") from exc


class TilePrediction(Record):
    """The class map of one acquisition, made by one model version."""

    acquisition_id: str
    region: str
    model_version: int
    href: str | None = None  # prediction COG in storage, when stored
    class_shares: tuple[float, ...]
    mean_entropy: float
    latency_s: float
    created: datetime = Field(default_factory=utcnow)


class FeatureStats(Record):
    """Label-free statistics of one tile, as seen by the model that predicted it (the drift monitor's input)."""

    acquisition_id: str
    region: str
    model_version: int
    band_mean: tuple[float, ...]
    band_std: tuple[float, ...]
    residual_mean: tuple[float, ...]
    residual_std: tuple[float, ...]
    deep_mean: tuple[float, ...]
    bn_mean_shift: float
    bn_var_ratio: float
    class_shares: tuple[float, ...]
    mean_entropy: float
    mean_confidence: float


class DriftEvent(Record):
    """A region's calibrated test fired (or cleared)."""

    region: str
    acquisition_id: str
    tiles_seen: int
    signal: str
    score: float
    threshold: float
    fired: tuple[str, ...] = ()
    covariate: bool = False
    scores: dict[str, float] = Field(default_factory=dict)
    detected_at: datetime = Field(default_factory=utcnow)


class AdaptationJob(Record):
    """A request to adapt one region's model on its recent tiles."""

    job_id: str
    region: str
    base_version: int
    method: str
    tile_ids: tuple[str, ...]
    tile_hrefs: tuple[str, ...] = ()
    trigger: DriftEvent
    label_shift: tuple[float, ...] | None = None
    labels: tuple[str, ...] = ()  # labelled tiles (acquisition ids) of a few-shot job; empty = label-free job
    created: datetime = Field(default_factory=utcnow)


class ModelVersion(Record):
    """A stored model version of one region's lineage."""

    region: str
    version: int
    parent: int | None
    method: str
    sha256: str
    href: str
    accepted: bool = True
    gate_reasons: tuple[str, ...] = ()
    gate_metrics: dict[str, float] = Field(default_factory=dict)
    job_id: str | None = None
    created: datetime = Field(default_factory=utcnow)


class RolloutStep(StrEnum):
    """The steps of a rollout, each reported as a RolloutEvent."""

    REGISTERED = "registered"
    SHADOW_PASSED = "shadow_passed"
    SHADOW_FAILED = "shadow_failed"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    PRUNED = "pruned"


class RolloutEvent(Record):
    """One step of deploying a model version for a region."""

    region: str
    version: int
    step: RolloutStep
    previous: int | None = None
    detail: str = ""
    at: datetime = Field(default_factory=utcnow)


#: where in the flow a message was dead-lettered
Stage = Literal["ingest", "predict", "adapt", "labels", "rollout"]


class DeadLetter(Record):
    """A payload that could not be processed, kept whole with the reason."""

    topic: str
    reason: str
    error: str
    payload: str
    key: str | None = None
    stage: Stage = "predict"
    at: datetime = Field(default_factory=utcnow)


class LabelRecord(Record):
    """A reference mask that arrives after the acquisition (delayed labels).

    ``href`` names a single-band GeoTIFF of the acquisition's size: class indices (``encoding="classes"``,
    255 = ignore) or raw FLAIR labels 1..19 (``encoding="flair19"``, mapped to the 13 classes on arrival).
    """

    acquisition_id: str
    region: str
    href: str
    encoding: Literal["classes", "flair19"] = "classes"
