"""The record of one parcel time series on the wire: a STAC Item with a time dimension, its data an ``.npz``.

The time dimension follows the STAC datacube extension: ``cube:dimensions.time`` lists every acquisition date
(``values``) and its ``extent``; ``cube:dimensions.bands`` lists the band names. ``datetime`` is null and
``start_datetime`` / ``end_datetime`` bound the series, as STAC asks of an item that spans an interval. The one
data asset is the array file (:func:`terradapt.crops.series.encode_series`) in object storage, with its sha256.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, time
from typing import Any

import numpy as np
import pystac
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from terradapt.crops.series import S2_BANDS, ParcelSeries, SeriesSpec, decode_series
from terradapt.errors import ChecksumMismatchError, InvalidPayloadError, InvalidSeriesError
from terradapt.records import ObjectId, Record, _errors, check_region, parse_stac_item

__all__ = ["DATACUBE_EXTENSION", "NPZ_MEDIA_TYPE", "SeriesAcquisition", "series_acquisition"]

DATACUBE_EXTENSION = "https://stac-extensions.github.io/datacube/v2.2.0/schema.json"
NPZ_MEDIA_TYPE = "application/x-npz"
_PREFIX = "terradapt:"


class SeriesAcquisition(Record):
    """One parcel's time series: T dates x C bands x S pixels, stored as an ``.npz`` at ``href``."""

    id: ObjectId
    parcel_id: str = Field(min_length=1, max_length=200)
    region: str
    country: str = Field(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2 code of the parcel's country")
    dates: tuple[date, ...] = Field(min_length=2)
    bands: tuple[str, ...] = S2_BANDS
    pixels: int = Field(default=1, ge=1)
    cloud_share: float = Field(default=0.0, ge=0.0, le=1.0)
    sensor: str = "sentinel-2"
    href: str = Field(min_length=1)
    sha256: str | None = None

    @field_validator("region")
    @classmethod
    def _valid_region(cls, value: str) -> str:
        return check_region(value)

    @model_validator(mode="after")
    def _increasing(self) -> SeriesAcquisition:
        for before, after in zip(self.dates, self.dates[1:], strict=False):
            if after <= before:
                raise ValueError(f"dates must be strictly increasing: {before} then {after}")
        return self

    def spec(self, max_nan_share: float = 0.2) -> SeriesSpec:
        """The spec the array file must meet: this item's bands (and the NaN limit given)."""
        return SeriesSpec(bands=self.bands, max_nan_share=max_nan_share)

    def read(self, data: bytes, *, max_nan_share: float = 0.2) -> ParcelSeries:
        """Decode and validate the array file's bytes against this item (checksum, bands, dates, pixels).

        Raises:
            ChecksumMismatchError: the bytes do not match ``sha256``.
            InvalidSeriesError: the array is invalid, or its dates or pixel count differ from the item's.

        """
        if self.sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != self.sha256:
                raise ChecksumMismatchError(self.href, self.sha256, actual)
        series = decode_series(data, parcel_id=self.parcel_id, region=self.region, spec=self.spec(max_nan_share))
        item_days = np.array(self.dates, dtype="datetime64[D]")
        if series.dates.shape != item_days.shape or bool((series.dates != item_days).any()):
            raise InvalidSeriesError("dates", f"{series.num_dates} dates in the file", f"the item's {len(self.dates)}")
        if series.num_pixels != self.pixels:
            raise InvalidSeriesError("pixels", series.num_pixels, f"the item's {self.pixels}")
        return series

    def to_stac(self) -> pystac.Item:
        """The STAC Item (no geometry: a parcel's outline is not carried here)."""
        start = datetime.combine(self.dates[0], time(), UTC)
        end = datetime.combine(self.dates[-1], time(), UTC)
        cube = {
            "time": {
                "type": "temporal",
                "extent": [start.isoformat(), end.isoformat()],
                "values": [d.isoformat() for d in self.dates],
            },
            "bands": {"type": "bands", "values": list(self.bands)},
            "pixels": {"type": "other", "extent": [0, self.pixels - 1], "description": "pixels of the parcel"},
        }
        item = pystac.Item(
            id=self.id,
            geometry=None,
            bbox=None,
            datetime=None,
            start_datetime=start,
            end_datetime=end,
            properties={
                f"{_PREFIX}region": self.region,
                f"{_PREFIX}schema_version": self.schema_version,
                f"{_PREFIX}parcel_id": self.parcel_id,
                f"{_PREFIX}country": self.country,
                f"{_PREFIX}cloud_share": self.cloud_share,
                "constellation": self.sensor,
                "cube:dimensions": cube,
            },
            stac_extensions=[DATACUBE_EXTENSION],
        )
        extra: dict[str, Any] = {"file:checksum": self.sha256} if self.sha256 else {}
        asset = pystac.Asset(href=self.href, media_type=NPZ_MEDIA_TYPE, roles=["data"], extra_fields=extra)
        asset.href = self.href
        item.add_asset("data", asset)
        return item

    def to_json(self) -> bytes:
        """STAC Item JSON: what travels on a topic."""
        return json.dumps(self.to_stac().to_dict(include_self_link=False)).encode()

    @classmethod
    def from_stac(cls, item: pystac.Item | dict[str, Any] | bytes | str) -> SeriesAcquisition:
        """Parse a STAC Item; raise InvalidPayloadError naming the field when it is not a series of ours."""
        wire = parse_stac_item(item, _SeriesItem, "series STAC Item")
        asset = wire.assets.get("data")
        if asset is None:
            raise InvalidPayloadError(f"STAC Item has no 'data' asset (assets: {sorted(wire.assets)[:5]})")
        props, cube = wire.properties, wire.properties.cube
        try:
            return cls(
                schema_version=props.schema_version,
                id=wire.id,
                parcel_id=props.parcel_id,
                region=props.region,
                country=props.country,
                dates=tuple(_day(v) for v in cube.time.values),
                bands=tuple(cube.bands.values),
                pixels=cube.pixels.extent[1] + 1,
                cloud_share=props.cloud_share,
                sensor=props.constellation,
                href=asset.href,
                sha256=asset.checksum,
            )
        except (ValidationError, ValueError) as exc:
            detail = _errors(exc) if isinstance(exc, ValidationError) else str(exc)
            raise InvalidPayloadError(f"STAC Item is not a valid series acquisition: {detail}") from exc


def _day(value: str) -> date:
    """An ISO date or datetime string as a date (a datetime must be at midnight UTC or carry no zone)."""
    return datetime.fromisoformat(value).date() if "T" in value else date.fromisoformat(value)


class _TimeDim(BaseModel):
    values: list[str] = Field(min_length=2)


class _BandsDim(BaseModel):
    values: list[str] = Field(min_length=1)


class _PixelsDim(BaseModel):
    extent: tuple[int, int]


class _Cube(BaseModel):
    time: _TimeDim
    bands: _BandsDim
    pixels: _PixelsDim


class _SeriesProperties(BaseModel):
    region: str = Field(alias="terradapt:region")
    schema_version: int = Field(default=1, alias="terradapt:schema_version")
    parcel_id: str = Field(alias="terradapt:parcel_id")
    country: str = Field(alias="terradapt:country")
    cloud_share: float = Field(default=0.0, alias="terradapt:cloud_share")
    constellation: str = "sentinel-2"
    cube: _Cube = Field(alias="cube:dimensions")


class _SeriesAsset(BaseModel):
    href: str
    checksum: str | None = Field(default=None, alias="file:checksum")


class _SeriesItem(BaseModel):
    type: str = Field(pattern="^Feature$")
    id: str
    properties: _SeriesProperties
    assets: dict[str, _SeriesAsset]


def series_acquisition(
    series: ParcelSeries, *, href: str, data: bytes, country: str, bands: tuple[str, ...] = S2_BANDS
) -> SeriesAcquisition:
    """The record of a series whose array file (``data``, from ``encode_series``) is stored at ``href``."""
    return SeriesAcquisition(
        id=f"{series.region}_{series.parcel_id}",
        parcel_id=series.parcel_id,
        region=series.region,
        country=country,
        dates=tuple(date.fromisoformat(str(d)) for d in series.dates.astype("datetime64[D]")),
        bands=bands,
        pixels=series.num_pixels,
        cloud_share=float(series.cloud.mean()),
        href=href,
        sha256=hashlib.sha256(data).hexdigest(),
    )
