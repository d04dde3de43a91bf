"""When a tile was captured, from the data: never the time it happened to be ingested.

Sources, first match wins (``CaptureTimes.resolve``):

1. an explicit time for every file (``terradapt ingest --datetime``);
2. a CSV of ``id,datetime`` rows, ``id`` being the file's name or stem (``IMG_000001.tif`` or ``IMG_000001``);
3. FLAIR's aerial metadata JSON (``{"IMG_000001": {"date": "2018-04-29", "time": "11h18", ...}}``), given or
   found beside the tiles (the tile's folder or one of its parents, ``*metadata*aerial*.json``);
4. the GeoTIFF's ``TIFFTAG_DATETIME`` (``YYYY:MM:DD HH:MM:SS``).

Times without a zone (FLAIR's, TIFF's) are taken as UTC. A tile none of them dates has an unknown capture time:
its item says so (``datetime: null``) and carries the campaign's ``start_datetime``/``end_datetime`` when given.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

__all__ = ["CaptureTime", "CaptureTimes", "UnknownCaptureTimeError", "csv_times", "flair_metadata_times"]

from pydantic import BaseModel, ConfigDict, model_validator

from terradapt.errors import UnknownCaptureTimeError

Source = Literal["option", "csv", "flair-metadata", "tiff-tag", "unknown"]
_DateTime = datetime  # the type, for annotations beside a field named ``datetime``
_TIFF_DATETIME = re.compile(r"^(\d{4}):(\d{2}):(\d{2}) (\d{2}):(\d{2}):(\d{2})$")
_FLAIR_TIME = re.compile(r"^(\d{1,2})h(\d{2})$")
#: how far up from a tile's folder a FLAIR metadata JSON is looked for (FLAIR: root/domain/zone/img/IMG_x.tif)
_SEARCH_LEVELS = 4


class CaptureTime(BaseModel):
    """A tile's capture time (or the campaign interval that bounds an unknown one) and where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    datetime: _DateTime | None = None
    start: _DateTime | None = None
    end: _DateTime | None = None
    source: Source = "unknown"

    @model_validator(mode="after")
    def _ordered(self) -> CaptureTime:
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError(f"campaign start {self.start.isoformat()} is after its end {self.end.isoformat()}")
        return self

    @property
    def known(self) -> bool:
        """Whether the capture time itself is known (not just bounded)."""
        return self.datetime is not None


def parse_datetime(text: str, what: str = "datetime") -> datetime:
    """An ISO 8601 / RFC 3339 date or datetime; without a zone, UTC.

    Raises:
        ValueError: Not a date; the message names ``what`` and the accepted form.

    """
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what}={text!r}; accepted: ISO 8601, e.g. 2021-06-14 or 2021-06-14T10:22:00Z") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def tiff_datetime(data: bytes) -> datetime | None:
    """The ``TIFFTAG_DATETIME`` of GeoTIFF bytes (as UTC), or None when absent, malformed or unreadable."""
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as mem, mem.open() as src:
            tag = src.tags().get("TIFFTAG_DATETIME", "")
    except (RasterioError, ValueError):
        return None
    match = _TIFF_DATETIME.match(tag.strip())
    if not match:
        return None
    try:
        year, month, day, hour, minute, second = map(int, match.groups())
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:  # 0000:00:00 00:00:00 and other impossible dates
        return None


def flair_metadata_times(path: Path) -> dict[str, datetime]:
    """Capture times by image id (``IMG_000001``) from a FLAIR aerial metadata JSON; undated entries are left out.

    Raises:
        ValueError: The file is not a JSON object of objects.

    """
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a FLAIR metadata JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a FLAIR metadata JSON (expected an object keyed by image id)")
    times = {}
    for image, meta in document.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("date"), str):
            continue
        hour, minute = 0, 0
        clock = _FLAIR_TIME.match(str(meta.get("time", "")).strip())
        if clock:
            hour, minute = int(clock.group(1)), int(clock.group(2))
        try:
            day = datetime.fromisoformat(meta["date"].strip())
            times[str(image)] = day.replace(hour=hour, minute=minute, tzinfo=UTC)
        except ValueError:
            continue
    return times


def csv_times(path: Path) -> dict[str, datetime]:
    """Capture times from a CSV of ``id,datetime`` rows (an optional header row ``id,datetime`` is skipped).

    Raises:
        ValueError: A row is not ``id,datetime`` or its datetime does not parse; the message names the line.

    """
    times = {}
    with path.open(newline="") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if not row or (line == 1 and [c.strip().lower() for c in row] == ["id", "datetime"]):
                continue
            if len(row) != 2 or not row[0].strip():
                raise ValueError(f"{path}:{line}: {row!r}; accepted: id,datetime")
            times[row[0].strip()] = parse_datetime(row[1], f"{path}:{line} datetime")
    return times


@dataclass
class CaptureTimes:
    """Resolves each file's capture time from the configured sources (see the module docstring for the order).

    Attributes:
        fixed: One time for every file (``--datetime``).
        table: Times by file name or stem (``--datetimes`` CSV).
        flair: Times by image id from FLAIR metadata files given explicitly.
        campaign_start: Start of the campaign, for tiles whose own time is unknown.
        campaign_end: End of the campaign.
        require: Raise ``UnknownCaptureTimeError`` for a tile neither dated nor bounded by a campaign.
        find_flair: Look for FLAIR metadata beside each tile.

    """

    fixed: datetime | None = None
    table: Mapping[str, datetime] = field(default_factory=dict)
    flair: Mapping[str, datetime] = field(default_factory=dict)
    campaign_start: datetime | None = None
    campaign_end: datetime | None = None
    require: bool = False
    find_flair: bool = True
    _found: dict[Path, dict[str, datetime]] = field(default_factory=dict, repr=False)

    def _beside(self, path: Path) -> dict[str, datetime]:
        """FLAIR metadata in the tile's folder or a parent (each folder read once per run)."""
        merged: dict[str, datetime] = {}
        folder = path.parent
        for _ in range(_SEARCH_LEVELS):
            if folder not in self._found:
                found: dict[str, datetime] = {}
                for candidate in sorted(folder.glob("*metadata*aerial*.json")) if folder.is_dir() else []:
                    found.update(flair_metadata_times(candidate))
                self._found[folder] = found
            merged = {**self._found[folder], **merged}  # the nearest file wins
            if folder.parent == folder:
                break
            folder = folder.parent
        return merged

    def resolve(self, path: Path, data: bytes) -> CaptureTime:
        """The capture time of one file (its bytes give the TIFF tag).

        Raises:
            UnknownCaptureTimeError: ``require`` is set and nothing dates or bounds the tile.

        """
        if self.fixed is not None:
            return CaptureTime(datetime=self.fixed, source="option")
        for key in (path.name, path.stem):
            if key in self.table:
                return CaptureTime(datetime=self.table[key], source="csv")
        flair = {**(self._beside(path) if self.find_flair else {}), **self.flair}
        if path.stem in flair:
            return CaptureTime(datetime=flair[path.stem], source="flair-metadata")
        tagged = tiff_datetime(data)
        if tagged is not None:
            return CaptureTime(datetime=tagged, source="tiff-tag")
        if self.require and (self.campaign_start is None or self.campaign_end is None):
            raise UnknownCaptureTimeError(
                f"capture time of {path.name} unknown: no TIFFTAG_DATETIME, FLAIR metadata, --datetimes row or "
                "--datetime; give one, or the campaign's --campaign-start and --campaign-end"
            )
        return CaptureTime(start=self.campaign_start, end=self.campaign_end)
