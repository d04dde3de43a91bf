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
from typing import Annotated, Any, Literal, TypeVar

import pystac
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from terradapt.errors import InvalidPayloadError
from terradapt.stac import eo_band, footprint, is_authority_code, multihash_sha256, sha256_from_checksum

#: 2: acquisition items with WGS84 geometry/bbox, projection extension, multihash checksum, nullable datetime
SCHEMA_VERSION = 2

#: FLAIR-style departement codes (D001..D095, D02A, D02B) or dataset areas such as "dubai-3" / "synth-1".
REGION_PATTERN = re.compile(r"^(D0[0-9]{2}|D02[AB]|[a-z]+-[0-9]+)$")

#: acquisition and job ids: they become object keys (``<region>/<id>.tif``), so no path separators, no leading dot
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+@-]{0,199}$")

_STAC_EXTENSION_PREFIX = "terradapt:"
_DateTime = datetime  # the type, for annotations after a field named ``datetime``


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


def check_id(value: str) -> str:
    """Validate an acquisition or job id; raise ValueError naming the accepted form."""
    if not ID_PATTERN.match(value):
        raise ValueError(
            f"id {value[:80]!r} is not an object id: expected 1 to 200 of A-Z a-z 0-9 _ . : + @ -, not starting "
            "with '.', '-', ':', '+' or '@' (ids become object keys: no '/')"
        )
    return value


#: an acquisition or job id (safe as the last segment of an object key)
ObjectId = Annotated[str, AfterValidator(check_id)]
#: a region code (the first segment of object keys, and the Kafka key)
Region = Annotated[str, AfterValidator(check_region)]


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


def _errors(exc: ValidationError) -> str:
    """The first validation errors, each as ``field: message (value)``, short enough for a dead letter."""
    parts = []
    for error in exc.errors(include_url=False)[:3]:
        where = ".".join(str(part) for part in error["loc"]) or "payload"
        value = repr(error.get("input"))
        parts.append(f"{where}: {error['msg']} [{error['type']}] (got {value[:80]}{'...' if len(value) > 80 else ''})")
    return "; ".join(parts)


W = TypeVar("W", bound=BaseModel)


def parse_stac_item(item: pystac.Item | dict[str, Any] | bytes | str, wire: type[W], kind: str = "STAC Item") -> W:
    """Read a STAC Item (object, dict or JSON) into the ``wire`` model of the fields a record reads.

    Any payload ends as a ``wire`` model or an InvalidPayloadError naming the field, whatever its shape.

    Raises:
        InvalidPayloadError: not JSON, not a JSON object, or not a ``kind`` (``wire`` refuses it).

    """
    try:
        if isinstance(item, pystac.Item):
            item = item.to_dict(include_self_link=False)
        elif isinstance(item, (bytes, str)):
            item = json.loads(item)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or nested past the parser's stack
        raise InvalidPayloadError(f"payload is not a STAC Item: not JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(item, dict):
        raise InvalidPayloadError(f"payload is not a STAC Item: expected a JSON object, got {type(item).__name__}")
    try:
        return wire.model_validate(item)
    except ValidationError as exc:
        raise InvalidPayloadError(f"payload is not a {kind}: {_errors(exc)}") from exc


def parse_record(cls: type[R], payload: bytes | str | dict[str, Any]) -> R:
    """Parse a payload into a record, raising InvalidPayloadError with the reason on any problem."""
    try:
        if isinstance(payload, dict):
            return cls.model_validate(payload)
        return cls.model_validate_json(payload)
    except ValidationError as exc:
        raise InvalidPayloadError(f"payload is not a valid {cls.__name__}: {_errors(exc)}") from exc


class _StacBand(BaseModel):
    name: str


class _StacAsset(BaseModel):
    """The fields of a STAC asset an acquisition reads (anything else is allowed and ignored)."""

    href: str
    bands: list[_StacBand] = Field(default_factory=list, alias="eo:bands")
    checksum: str | None = Field(default=None, alias="file:checksum")


class _StacProperties(BaseModel):
    region: str = Field(alias="terradapt:region")  # _STAC_EXTENSION_PREFIX
    schema_version: int = Field(default=SCHEMA_VERSION, alias="terradapt:schema_version")
    moment: datetime | None = Field(alias="datetime")  # STAC: always present, null when unknown
    start: datetime | None = Field(default=None, alias="start_datetime")
    end: datetime | None = Field(default=None, alias="end_datetime")
    proj_code: str | None = Field(default=None, alias="proj:code")
    proj_wkt2: str | None = Field(default=None, alias="proj:wkt2")
    proj_bbox: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat] | None = Field(default=None, alias="proj:bbox")
    proj_shape: tuple[PositiveInt, PositiveInt] | None = Field(default=None, alias="proj:shape")
    proj_transform: list[FiniteFloat] | None = Field(default=None, alias="proj:transform", min_length=6, max_length=9)
    constellation: str = "aerial-vhr"


class _StacItem(BaseModel):
    """The wire form of an acquisition: the STAC Item fields it reads, typed (other STAC fields pass unread)."""

    type: Literal["Feature"]
    id: str
    bbox: list[FiniteFloat] | None = None
    properties: _StacProperties
    assets: dict[str, _StacAsset]


def _utc(value: _DateTime | None) -> _DateTime | None:
    """A datetime without a zone is taken as UTC (RFC 3339 requires one)."""
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


class Acquisition(Record):
    """One newly acquired tile: a STAC Item whose single data asset is a GeoTIFF in storage.

    ``datetime`` is the capture time, None when the data does not tell it (never the time of ingest); then
    ``start_datetime``/``end_datetime`` bound it when the campaign is known. ``bbox``, ``shape`` (rows, columns)
    and ``transform`` (affine a, b, c, d, e, f) describe the tile's grid in its own ``crs``.
    """

    id: ObjectId
    region: str
    datetime: datetime | None
    bbox: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat]
    crs: str | None = "EPSG:2154"
    sensor: str = "aerial-vhr"
    bands: tuple[str, ...] = ("red", "green", "blue", "nir", "elevation")
    href: str = Field(min_length=1)
    sha256: str | None = None
    start_datetime: _DateTime | None = None
    end_datetime: _DateTime | None = None
    shape: tuple[PositiveInt, PositiveInt] | None = None
    transform: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat] | None = None

    @field_validator("region")
    @classmethod
    def _valid_region(cls, value: str) -> str:
        return check_region(value)

    @property
    def acquired(self) -> _DateTime | None:
        """The capture time, else the campaign start, else None (what plots of drift against time use)."""
        return self.datetime or self.start_datetime

    def to_stac(self) -> pystac.Item:
        """Build the STAC 1.1 Item: WGS84 geometry and bbox, the tile grid in the projection extension.

        Extensions used (and listed in ``stac_extensions``): projection, eo (band names on the data asset), file
        (``file:checksum`` as a sha2-256 multihash) when the checksum is known. The pipeline's own fields are the
        ``terradapt:`` properties. A footprint that cannot be reprojected (no or unknown CRS) is a null geometry.
        """
        from pystac.extensions.eo import Band, EOExtension
        from pystac.extensions.file import FileExtension
        from pystac.extensions.projection import ProjectionExtension

        geometry, lonlat = footprint(self.bbox, self.crs)
        unknown = self.datetime is None and (self.start_datetime is None or self.end_datetime is None)
        item = pystac.Item(
            id=self.id,
            geometry=geometry,
            bbox=list(lonlat) if lonlat else None,
            datetime=utcnow() if unknown else self.datetime,  # replaced by null below: pystac refuses no time
            start_datetime=self.start_datetime if self.datetime is None else None,
            end_datetime=self.end_datetime if self.datetime is None else None,
            properties={
                f"{_STAC_EXTENSION_PREFIX}region": self.region,
                f"{_STAC_EXTENSION_PREFIX}schema_version": SCHEMA_VERSION,
                "constellation": self.sensor,
            },
        )
        if unknown:
            item.datetime = None
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        proj.apply(
            code=self.crs if self.crs and is_authority_code(self.crs) else None,
            wkt2=self.crs if self.crs and not is_authority_code(self.crs) else None,
            bbox=list(self.bbox),
            shape=list(self.shape) if self.shape else None,
            transform=list(self.transform) if self.transform else None,
        )
        if self.crs is None:
            item.properties["proj:code"] = None  # the projection extension's "no CRS"
        asset = pystac.Asset(href=self.href, media_type=pystac.MediaType.GEOTIFF, roles=["data"])
        item.add_asset("data", asset)
        EOExtension.ext(asset, add_if_missing=True).apply(bands=[Band(eo_band(b)) for b in self.bands])
        if self.sha256:
            FileExtension.ext(asset, add_if_missing=True).apply(checksum=multihash_sha256(self.sha256))
        asset.href = self.href  # pystac turns backslashes into slashes: the wire carries the href as given
        return item

    def to_json(self) -> bytes:
        """Serialize as STAC Item JSON: what travels on the acquisitions topic."""
        return json.dumps(self.to_stac().to_dict(include_self_link=False)).encode()

    @classmethod
    def from_stac(cls, item: pystac.Item | dict[str, Any] | bytes | str) -> Acquisition:
        """Parse a STAC Item (object, dict or JSON); raise InvalidPayloadError when it is not one of ours.

        The JSON is checked against the fields an acquisition reads (``_StacItem``) before anything is built from
        it, so any payload ends as an acquisition or an InvalidPayloadError naming the field, whatever its shape.
        A datetime without a zone is taken as UTC (RFC 3339 requires one). The tile's own bbox is ``proj:bbox``;
        items of schema version 1 (bbox and geometry in the tile CRS, bare sha256 checksum) still parse.
        """
        wire = parse_stac_item(item, _StacItem)
        asset = wire.assets.get("data")
        if asset is None:
            raise InvalidPayloadError(f"STAC Item has no 'data' asset (assets: {sorted(wire.assets)[:5]})")
        props = wire.properties
        native = props.proj_bbox or (tuple(wire.bbox) if wire.bbox and props.schema_version < 2 else None)
        if native is None and props.schema_version >= 2:
            raise InvalidPayloadError("STAC Item has no 'proj:bbox' (the tile's bbox in its own CRS)")
        try:
            return cls(
                schema_version=props.schema_version,
                id=wire.id,
                region=props.region,
                datetime=_utc(props.moment),
                start_datetime=_utc(props.start),
                end_datetime=_utc(props.end),
                bbox=native or (0.0, 0.0, 0.0, 0.0),  # type: ignore[arg-type]
                crs=props.proj_code or props.proj_wkt2,
                sensor=props.constellation,
                bands=tuple(b.name for b in asset.bands),
                href=asset.href,
                sha256=sha256_from_checksum(asset.checksum) if asset.checksum else None,
                shape=props.proj_shape,
                transform=tuple(props.proj_transform[:6]) if props.proj_transform else None,  # type: ignore[arg-type]
            )
        except ValidationError as exc:
            raise InvalidPayloadError(f"STAC Item is not a valid acquisition: {_errors(exc)}") from exc


class TilePrediction(Record):
    """The class map of one acquisition, made by one model version."""

    acquisition_id: str
    region: str
    model_version: int
    href: str | None = None  # prediction COG in storage, when stored
    acquired: datetime | None = None  # the acquisition's capture time (or campaign start), None when unknown
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

    region: Region
    acquisition_id: ObjectId
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

    job_id: ObjectId
    region: Region
    base_version: int
    method: str
    tile_ids: tuple[ObjectId, ...]
    tile_hrefs: tuple[str, ...] = ()
    trigger: DriftEvent
    label_shift: tuple[FiniteFloat, ...] | None = None
    labels: tuple[ObjectId, ...] = ()  # labelled tiles (acquisition ids) of a few-shot job; empty = label-free job
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

    acquisition_id: ObjectId
    region: Region
    href: str
    encoding: Literal["classes", "flair19"] = "classes"
