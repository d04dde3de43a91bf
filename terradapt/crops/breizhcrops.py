"""Parcel time series in the BreizhCrops raw CSV layout: a reader, and a writer of that layout for tests and demos.

The layout (as in the BreizhCrops data archive; nothing is downloaded here)::

    <root>/classmapping.csv          id,classid,classname,code     (crop code -> class index and name)
    <root>/ids/<area>.txt            one parcel id per line, e.g. ids/frh01.txt
    <root>/csv/<area>/<id>.csv       one row per acquisition:
                                     B1,B10,B11,B12,B2,B3,B4,B5,B6,B7,B8,B8A,B9,QA10,QA20,QA60,doa,label,id

Band values are reflectance x 10 000; ``doa`` is the acquisition date (``YYYY-MM-DD``); ``label`` is the parcel's
crop code (the RPG ``CODE_CULTU``, which EuroCrops also keeps), mapped to a class by ``classmapping.csv``;
``QA60`` is the Sentinel-2 cloud bitmask (bit 10 opaque clouds, bit 11 cirrus), read as the cloud mask.
BreizhCrops stores the *mean* over a parcel's pixels, so every series read here has ``S = 1`` pixel. Rows are
sorted by date, and rows of one date (a parcel seen from two overlapping tiles) are averaged, so the series has
strictly increasing dates. The 10 bands of :data:`~terradapt.crops.series.S2_BANDS` are kept (B1, B9, B10 are
atmospheric bands). An area folder name such as ``frh01`` becomes the region code ``frh-1``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from terradapt.crops.series import S2_BANDS, ParcelSeries
from terradapt.errors import InvalidSeriesError, UnknownRegionError

__all__ = ["CSV_COLUMNS", "BreizhCropsDataset", "area_region", "write_breizhcrops"]

#: the columns of one parcel CSV, in the archive's order
CSV_COLUMNS: tuple[str, ...] = (
    *("B1", "B10", "B11", "B12", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9"),
    *("QA10", "QA20", "QA60", "doa", "label", "id"),
)
_CLOUD_BITS = (1 << 10) | (1 << 11)
_SCALE = 10_000.0
_AREA = re.compile(r"^([a-z]+)0*([0-9]+)$")
_LAYOUT = "<root>/classmapping.csv, <root>/ids/<area>.txt, <root>/csv/<area>/<id>.csv"


def area_region(area: str) -> str:
    """The region code of a BreizhCrops area folder name (``frh01`` -> ``frh-1``)."""
    match = _AREA.match(area)
    if match is None:
        raise ValueError(f"area {area!r} is not a BreizhCrops area name such as 'frh01'")
    return f"{match.group(1)}-{int(match.group(2))}"


class BreizhCropsDataset:
    """Parcels of a folder in the BreizhCrops raw CSV layout, by region.

    Args:
        root: Folder holding ``classmapping.csv``, ``ids/`` and ``csv/``.

    Raises:
        FileNotFoundError: the folder does not follow the layout.

    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        mapping = self.root / "classmapping.csv"
        if not mapping.is_file() or not (self.root / "ids").is_dir():
            raise FileNotFoundError(f"{self.root} is not a BreizhCrops folder; expected {_LAYOUT}")
        self._code_to_class: dict[str, int] = {}
        names: dict[int, str] = {}
        with mapping.open(newline="") as handle:
            for row in csv.DictReader(handle):
                index = int(row["classid"])
                self._code_to_class[row["code"]] = index
                names[index] = row["classname"]
        if sorted(names) != list(range(len(names))):
            raise FileNotFoundError(f"{mapping}: classid values must be 0..K-1, got {sorted(names)}")
        self._classes = tuple(names[i] for i in range(len(names)))
        self._areas = {area_region(p.stem): p.stem for p in sorted((self.root / "ids").glob("*.txt"))}

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; a label i means classes[i]."""
        return self._classes

    @property
    def band_names(self) -> tuple[str, ...]:
        """The bands of every series read (the 10 Sentinel-2 bands)."""
        return S2_BANDS

    def regions(self) -> list[str]:
        """Region codes (one per area), sorted."""
        return sorted(self._areas)

    def parcel_ids(self, region: str) -> list[str]:
        """Parcel ids of a region, in the order of its ids file."""
        area = self._area(region)
        lines = (self.root / "ids" / f"{area}.txt").read_text().split()
        return [line.strip() for line in lines if line.strip()]

    def load(self, region: str, parcel_id: str) -> ParcelSeries:
        """Read one parcel's CSV as a series (S = 1; label -1 when its crop code is not in the class mapping).

        Raises:
            UnknownRegionError: the region is not in this folder.
            FileNotFoundError: the parcel's CSV is missing.
            InvalidSeriesError: a column is missing or a value is not a number or a date.

        """
        path = self.root / "csv" / self._area(region) / f"{parcel_id}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"parcel {parcel_id!r} of {region}: {path} is missing ({_LAYOUT})")
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = sorted(set(CSV_COLUMNS) - set(reader.fieldnames or ()))
            if missing:
                raise InvalidSeriesError("columns", missing, f"every column of {list(CSV_COLUMNS)}")
            rows = list(reader)
        if not rows:
            raise InvalidSeriesError("rows", 0, "one row per acquisition date", reason="invalid_series")
        try:
            days = np.array([np.datetime64(row["doa"][:10], "D") for row in rows])
            bands = np.array([[float(row[b]) for b in S2_BANDS] for row in rows], dtype=np.float64) / _SCALE
            cloudy = np.array([(int(float(row["QA60"])) & _CLOUD_BITS) != 0 for row in rows])
        except ValueError as exc:
            raise InvalidSeriesError("values", str(exc)[:80], "numbers and YYYY-MM-DD dates") from exc
        unique, inverse = np.unique(days, return_inverse=True)  # sorted; rows of one date are averaged
        values = np.zeros((len(unique), len(S2_BANDS)), dtype=np.float64)
        np.add.at(values, inverse, bands)
        counts = np.bincount(inverse, minlength=len(unique))[:, None]
        cloud = np.zeros(len(unique), dtype=np.float64)
        np.add.at(cloud, inverse, cloudy.astype(np.float64))
        return ParcelSeries(
            values=(values / counts).astype(np.float32)[:, :, None],
            dates=unique.astype("datetime64[D]"),
            cloud=(cloud / counts[:, 0] >= 0.5)[:, None],
            label=self._code_to_class.get(rows[0]["label"], -1),
            parcel_id=parcel_id,
            region=region,
        )

    def _area(self, region: str) -> str:
        if region not in self._areas:
            raise UnknownRegionError(region, self.regions())
        return self._areas[region]


def write_breizhcrops(root: str | Path, area: str, series: Sequence[ParcelSeries], classes: Sequence[str]) -> None:
    """Write series in the BreizhCrops raw CSV layout under ``root`` (area ``area``, e.g. ``frh01``).

    A series with several pixels is written as its per-date mean over non-cloudy pixels (all pixels when a date
    is cloudy everywhere), as BreizhCrops stores parcels. Crop codes are ``C<classid>``; B1, B9 and B10 (not
    read back) are written as 0; a cloudy date gets QA60 = 1024 (opaque clouds).
    """
    root = Path(root)
    (root / "ids").mkdir(parents=True, exist_ok=True)
    (root / "csv" / area).mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    mapping = csv.writer(buffer, lineterminator="\n")
    mapping.writerow(["id", "classid", "classname", "code"])
    for index, name in enumerate(classes):
        mapping.writerow([index, index, name, f"C{index}"])
    (root / "classmapping.csv").write_text(buffer.getvalue())
    for s in series:
        clear = ~s.cloud
        weight = np.where(clear.any(axis=1, keepdims=True), clear, True).astype(np.float64)  # (T, S)
        mean = (np.nan_to_num(s.values) * weight[:, None, :]).sum(axis=2) / weight.sum(axis=1)[:, None]
        cloudy = s.cloud.mean(axis=1) >= 0.5
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for t in range(s.num_dates):
            by_band = {b: round(float(mean[t, i]) * _SCALE) for i, b in enumerate(S2_BANDS)}
            reflectance = [by_band.get(b, 0) for b in CSV_COLUMNS[:13]]
            label = f"C{s.label}" if s.label >= 0 else "UNKNOWN"
            writer.writerow([*reflectance, 0, 0, 1024 if cloudy[t] else 0, str(s.dates[t]), label, s.parcel_id])
        (root / "csv" / area / f"{s.parcel_id}.csv").write_text(buffer.getvalue())
    (root / "ids" / f"{area}.txt").write_text("".join(f"{s.parcel_id}\n" for s in series))
