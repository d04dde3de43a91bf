"""A parcel (or patch) time series as arrays, its validation, and its storage format (``.npz``, never a pickle).

One series is ``T`` acquisition dates x ``C`` bands x ``S`` pixels of one parcel: ``values`` (T, C, S) float32
surface reflectance (0..1, Sentinel-2 L2A digital numbers / 10 000), ``dates`` (T,) ``datetime64[D]``, strictly
increasing, and ``cloud`` (T, S) bool (True = the pixel is cloudy on that date). A parcel-mean series, such as the
BreizhCrops CSVs store, is the case ``S = 1``. ``label`` is the crop class index, or -1 when unknown (a live stream).

The array file holds only numeric arrays (``values``, ``days`` as int64 days since 1970-01-01, ``cloud``,
``label``) and is read with ``allow_pickle=False``; names, region and band names travel in the STAC item
(:mod:`terradapt.crops.records`).
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from terradapt.errors import InvalidSeriesError

__all__ = ["S2_BANDS", "ParcelSeries", "SeriesSpec", "decode_series", "encode_series", "validate_series"]

#: the 10 Sentinel-2 bands at 10 m and 20 m (what PSE+TAE and most crop-mapping work use)
S2_BANDS: tuple[str, ...] = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")

_NPZ_KEYS = frozenset({"values", "days", "cloud", "label"})


@dataclass
class ParcelSeries:
    """The time series of one parcel.

    Attributes:
        values: Reflectance (T, C, S), float32; NaN marks a missing value.
        dates: Acquisition dates (T,), ``datetime64[D]``.
        cloud: Cloud mask (T, S), bool.
        label: Crop class index, -1 when unknown.
        parcel_id: Identifier of the parcel, unique within its region.
        region: Region code of the parcel's country or area, e.g. "fr-1".

    """

    values: npt.NDArray[np.float32]
    dates: npt.NDArray[np.datetime64]
    cloud: npt.NDArray[np.bool_]
    label: int = -1
    parcel_id: str = "parcel"
    region: str = "synth-1"

    @property
    def num_dates(self) -> int:
        """T."""
        return int(self.values.shape[0])

    @property
    def num_pixels(self) -> int:
        """S."""
        return int(self.values.shape[2])

    def day_of_year(self) -> npt.NDArray[np.int64]:
        """Day of year of every date (1..366), the position the temporal encoder sees."""
        years = self.dates.astype("datetime64[Y]")
        days: npt.NDArray[np.int64] = (self.dates - years.astype("datetime64[D]")).astype(np.int64) + 1
        return days


@dataclass(frozen=True)
class SeriesSpec:
    """What a valid series looks like (the ingest edge checks every series against it).

    Attributes:
        bands: Expected band names, in order (C = their count).
        max_nan_share: Largest accepted share of NaN values (clouds are flagged, not NaN).
        min_dates: Fewest acquisition dates.
        max_dates: Most acquisition dates.
        max_pixels: Most pixels per date.

    """

    bands: tuple[str, ...] = S2_BANDS
    max_nan_share: float = 0.2
    min_dates: int = 2
    max_dates: int = 400
    max_pixels: int = 4096


def validate_series(series: ParcelSeries, spec: SeriesSpec | None = None) -> ParcelSeries:
    """Check a series against ``spec``; return it unchanged when valid.

    Raises:
        InvalidSeriesError: with reason ``wrong_band_count``, ``dates_not_increasing``, ``nan_share`` or
            ``invalid_series`` (shape, dtype, size, cloud mask, infinite values); the message names the field.

    """
    spec = spec or SeriesSpec()
    values, dates, cloud = series.values, series.dates, series.cloud
    if values.ndim != 3:
        raise InvalidSeriesError("values.shape", values.shape, "(T dates, C bands, S pixels)")
    t, c, s = values.shape
    if c != len(spec.bands):
        raise InvalidSeriesError("bands", c, f"{len(spec.bands)} bands {list(spec.bands)}", reason="wrong_band_count")
    if not spec.min_dates <= t <= spec.max_dates:
        raise InvalidSeriesError("dates", t, f"{spec.min_dates}..{spec.max_dates} acquisition dates")
    if not 1 <= s <= spec.max_pixels:
        raise InvalidSeriesError("pixels", s, f"1..{spec.max_pixels} pixels per date")
    if not np.issubdtype(values.dtype, np.floating):
        raise InvalidSeriesError("values.dtype", str(values.dtype), "a float dtype (reflectance)")
    if dates.shape != (t,) or not np.issubdtype(dates.dtype, np.datetime64):
        raise InvalidSeriesError("dates.shape", dates.shape, f"({t},) datetime64 values, one per date")
    steps = np.diff(dates.astype("datetime64[D]").astype(np.int64))
    if steps.size and int(steps.min()) <= 0:
        bad = int(np.argmax(steps <= 0))
        raise InvalidSeriesError(
            "dates",
            f"{dates[bad]} then {dates[bad + 1]} (index {bad + 1})",
            "strictly increasing acquisition dates",
            reason="dates_not_increasing",
        )
    if cloud.shape != (t, s) or cloud.dtype != np.bool_:
        raise InvalidSeriesError("cloud", f"{cloud.shape} {cloud.dtype}", f"({t}, {s}) bool mask (True = cloudy)")
    nan = np.isnan(values)
    share = float(nan.mean())
    if share > spec.max_nan_share:
        raise InvalidSeriesError(
            "values", f"{share:.1%} NaN", f"at most {spec.max_nan_share:.0%} NaN", reason="nan_share"
        )
    if bool(np.isinf(values).any()):
        raise InvalidSeriesError("values", "infinite values", "finite reflectance or NaN (missing)")
    return series


def encode_series(series: ParcelSeries) -> bytes:
    """The ``.npz`` bytes of a series (numeric arrays only; what goes to object storage)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        values=series.values.astype(np.float32),
        days=series.dates.astype("datetime64[D]").astype(np.int64),
        cloud=series.cloud.astype(np.bool_),
        label=np.asarray(series.label, dtype=np.int64),
    )
    return buffer.getvalue()


def decode_series(
    data: bytes, *, parcel_id: str = "parcel", region: str = "synth-1", spec: SeriesSpec | None = None
) -> ParcelSeries:
    """Read ``.npz`` bytes (``allow_pickle=False``) and validate the series.

    Raises:
        InvalidSeriesError: the bytes are not an npz of the expected arrays, or the series is invalid.

    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            keys = set(npz.files)
            if keys != _NPZ_KEYS:
                raise InvalidSeriesError("npz arrays", sorted(keys), f"exactly {sorted(_NPZ_KEYS)}")
            values = npz["values"]
            days = npz["days"]
            cloud = npz["cloud"]
            label = npz["label"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:  # what corrupt npz bytes raise
        if isinstance(exc, InvalidSeriesError):
            raise
        raise InvalidSeriesError(
            "file", f"{type(exc).__name__}: {exc}"[:120], "an .npz written by encode_series"
        ) from exc
    if not np.issubdtype(days.dtype, np.integer) or label.shape != () or not np.issubdtype(label.dtype, np.integer):
        raise InvalidSeriesError("npz arrays", f"days {days.dtype}, label {label.shape}", "int64 days, scalar label")
    series = ParcelSeries(
        values=values,
        dates=days.astype("datetime64[D]"),
        cloud=cloud,
        label=int(label),
        parcel_id=parcel_id,
        region=region,
    )
    return validate_series(series, spec)
