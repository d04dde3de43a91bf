"""Label-free drift signals of parcel time series: one feature vector per parcel and signal, for any detector.

The detectors (``monitoring.detectors``) take one vector per item; a parcel gives three, each answering a
different question:

* ``profile``: the parcel's NDVI *against the source calendar*: its clear-sky NDVI interpolated onto fixed days of
  year (``grid``), plus the day NDVI first crosses ``green_ndvi`` and the day of its peak. A season that runs later
  moves these, whatever the acquisition calendar (clouds and other revisit days are interpolated over);
* ``radiometry``: season means of a few bands (red, NIR, SWIR by default) over clear pixels: a sensor gain or
  another atmospheric correction moves them, a phenology shift barely does;
* ``prediction``: the model's mean class probabilities (prediction shares, once averaged over a window) and the
  prediction entropy: what the model makes of the parcels, label shift included.

Every value is finite: a parcel without a clear date gets the grid's NDVI of 0 and the bands' reflectance of 0 (an
outlier on purpose: such parcels should be rare, and are worth seeing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from terradapt.crops.series import S2_BANDS, ParcelSeries

__all__ = ["SeriesFeatureConfig", "SeriesSignals", "prediction_features", "series_features"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SeriesFeatureConfig:
    """What the profile and radiometry signals measure.

    Attributes:
        grid: Days of year the NDVI profile is read at (the source calendar's reference points).
        green_ndvi: NDVI above which a parcel counts as green (green-up day).
        bands: Bands whose season means form the radiometry signal.
        red: Name of the red band (NDVI).
        nir: Name of the near-infrared band (NDVI).

    """

    grid: tuple[int, ...] = tuple(range(30, 331, 30))
    green_ndvi: float = 0.5
    bands: tuple[str, ...] = ("B4", "B8", "B11")
    red: str = "B4"
    nir: str = "B8"


@dataclass(frozen=True)
class SeriesSignals:
    """Per-parcel feature vectors, one array (N, d) per signal."""

    profile: Array
    radiometry: Array

    def as_dict(self) -> dict[str, Array]:
        """Signal name -> (N, d) array (what a per-signal monitor takes)."""
        return {"profile": self.profile, "radiometry": self.radiometry}


def _clear_means(series: ParcelSeries) -> tuple[Array, npt.NDArray[np.bool_]]:
    """Per-date band means over clear pixels (T, C) and which dates have any clear pixel."""
    values = series.values.astype(np.float64)
    clear = ~series.cloud & ~np.isnan(values).any(axis=1)  # (T, S)
    counts = clear.sum(axis=1)
    sums = np.where(clear[:, None, :], np.nan_to_num(values), 0.0).sum(axis=2)
    return sums / np.maximum(counts, 1)[:, None], counts > 0


def series_features(
    series: Sequence[ParcelSeries], config: SeriesFeatureConfig | None = None, bands: Sequence[str] = S2_BANDS
) -> SeriesSignals:
    """The ``profile`` and ``radiometry`` vectors of every parcel (label-free, model-free).

    Raises:
        ValueError: a configured band is not in ``bands``.

    """
    config = config or SeriesFeatureConfig()
    missing = sorted({config.red, config.nir, *config.bands} - set(bands))
    if missing:
        raise ValueError(f"bands {missing} are not in the series' bands {list(bands)}")
    red, nir = bands.index(config.red), bands.index(config.nir)
    chosen = [bands.index(b) for b in config.bands]
    grid = np.asarray(config.grid, dtype=np.float64)
    profiles = np.zeros((len(series), len(grid) + 2))
    radiometry = np.zeros((len(series), len(chosen)))
    for i, s in enumerate(series):
        means, clear = _clear_means(s)
        if not clear.any():
            continue
        days = s.day_of_year()[clear].astype(np.float64)
        m = means[clear]
        ndvi = (m[:, nir] - m[:, red]) / np.maximum(m[:, nir] + m[:, red], 1e-6)
        profiles[i, : len(grid)] = np.interp(grid, days, ndvi)
        green = np.flatnonzero(ndvi > config.green_ndvi)
        profiles[i, -2] = days[green[0]] if green.size else days[-1]
        profiles[i, -1] = days[int(np.argmax(ndvi))]
        radiometry[i] = m[:, chosen].mean(axis=0)
    # days are scaled to months so that the profile's NDVI (0..1) and its dates weigh alike before whitening
    profiles[:, -2:] /= 30.0
    return SeriesSignals(profile=profiles, radiometry=radiometry)


def prediction_features(logits: npt.ArrayLike) -> Array:
    """Per-parcel class probabilities and prediction entropy (N, K + 1), from the model's logits (N, K)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1, keepdims=True)
    return np.concatenate([p, entropy], axis=1)
