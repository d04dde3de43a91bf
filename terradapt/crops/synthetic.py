"""Seeded synthetic crop parcels with country-level domain factors (tests, demo, benchmark; nothing downloaded).

Each crop class has a phenology: a vegetation fraction ``v(doy)`` that rises at green-up and falls at senescence
(a double logistic, as used to fit real NDVI profiles), and reflectance mixes a soil and a vegetation spectrum by
``v`` (rapeseed adds its yellow flowering). Winter wheat and winter barley differ by about ten days of phenology,
maize and sunflower by about fifteen: a country whose season runs three weeks later is exactly the shift that
confuses a model trained elsewhere, which is why the benchmark has such countries.

A country (:class:`CountryFactors`) changes: the phenology (shift in days), the cloud rate, the sensor gain per
band, the crop class priors, and the acquisition calendar (first day, revisit, number of dates). Parcels vary
within a country (green-up and senescence jitter, vigour, soil brightness) and pixels within a parcel (noise).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from terradapt.crops.series import S2_BANDS, ParcelSeries

__all__ = ["COUNTRIES", "CROP_CLASSES", "CountryFactors", "generate_country", "generate_parcel"]

#: the crop classes of the synthetic countries
CROP_CLASSES: tuple[str, ...] = ("wheat", "barley", "rapeseed", "maize", "sunflower", "meadow")

#: per class: green-up day, senescence day, rise and fall widths (days), peak vegetation fraction, base fraction
_PHENOLOGY: dict[str, tuple[float, float, float, float, float, float]] = {
    "wheat": (80.0, 195.0, 9.0, 7.0, 0.85, 0.05),
    "barley": (68.0, 180.0, 9.0, 7.0, 0.80, 0.05),
    "rapeseed": (55.0, 170.0, 10.0, 7.0, 0.85, 0.10),
    "maize": (160.0, 265.0, 8.0, 8.0, 0.90, 0.02),
    "sunflower": (145.0, 245.0, 8.0, 7.0, 0.75, 0.02),
    "meadow": (75.0, 310.0, 15.0, 12.0, 0.55, 0.30),
}

#: soil and green-vegetation reflectance of the 10 Sentinel-2 bands (B2..B12)
_SOIL = np.array([0.08, 0.11, 0.14, 0.17, 0.19, 0.21, 0.23, 0.24, 0.30, 0.25], dtype=np.float32)
_VEG = np.array([0.03, 0.07, 0.04, 0.10, 0.28, 0.36, 0.40, 0.42, 0.22, 0.11], dtype=np.float32)
#: rapeseed flowers (yellow: green and red up, around day 115 of its own calendar)
_FLOWER = np.array([0.0, 0.06, 0.08, 0.05, 0.02, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)


@dataclass(frozen=True)
class CountryFactors:
    """What differs from one country to another.

    Attributes:
        region: Region code of the country, e.g. "fr-1".
        country: ISO 3166-1 alpha-2 code.
        phenology_shift_days: Days the whole season runs later (negative: earlier) than the reference.
        cloud_rate: Chance that a date is cloudy.
        sensor_gain: Multiplicative gain per band (one value = every band).
        class_prior: Share of every crop class among parcels (normalised).
        first_day: Day of year of the first acquisition.
        revisit_days: Days between acquisitions.
        num_dates: Acquisition dates per series.
        year: Year of the season.

    """

    region: str
    country: str
    phenology_shift_days: float = 0.0
    cloud_rate: float = 0.1
    sensor_gain: tuple[float, ...] = (1.0,)
    class_prior: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    first_day: int = 20
    revisit_days: int = 10
    num_dates: int = 30
    year: int = 2021

    def dates(self) -> npt.NDArray[np.datetime64]:
        """The acquisition calendar (T,), ``datetime64[D]``."""
        start = np.datetime64(f"{self.year}-01-01", "D") + (self.first_day - 1)
        return start + np.arange(self.num_dates) * self.revisit_days


#: the synthetic countries: sources to train on, one tuning target, held-out targets (see bench/crops.py)
COUNTRIES: dict[str, CountryFactors] = {
    f.region: f
    for f in (
        # sources
        CountryFactors("fr-1", "FR", 0.0, 0.10, (1.0,), (3, 2, 2, 3, 1, 2), first_day=20, revisit_days=10),
        CountryFactors("de-1", "DE", 5.0, 0.20, (1.0,), (3, 3, 2, 2, 1, 3), first_day=25, revisit_days=10),
        # tuning target: a later season, more clouds
        CountryFactors("dk-1", "DK", 24.0, 0.25, (1.0,), (3, 3, 3, 1, 1, 2), first_day=30, revisit_days=12),
        # held-out targets
        CountryFactors("lv-1", "LV", 32.0, 0.30, (0.92,), (3, 3, 2, 1, 1, 3), first_day=40, revisit_days=11),
        CountryFactors("si-1", "SI", -18.0, 0.15, (1.08,), (2, 1, 1, 3, 2, 2), first_day=10, revisit_days=9),
        CountryFactors("pt-1", "PT", 0.0, 0.10, (1.5, 1.4, 1.35, 1.3, 1.2, 1.15, 1.1, 1.1, 0.8, 0.75)),
    )
}


def _country_seed(factors: CountryFactors, seed: int) -> int:
    return (zlib.crc32(factors.region.encode()) + 7919 * seed) % (2**32)


def _vegetation(doy: npt.NDArray[np.float64], params: tuple[float, ...], shift: float) -> npt.NDArray[np.float64]:
    green, senesce, rise, fall, peak, base = params
    up = 1.0 / (1.0 + np.exp(-(doy - green - shift) / rise))
    down = 1.0 / (1.0 + np.exp(-(doy - senesce - shift) / fall))
    return np.asarray(base + (peak - base) * np.clip(up - down, 0.0, 1.0))


def generate_parcel(
    factors: CountryFactors,
    label: int,
    rng: np.random.Generator,
    *,
    parcel_id: str,
    pixels: int = 16,
) -> ParcelSeries:
    """One parcel of crop class ``label`` in the country ``factors`` describes."""
    dates = factors.dates()
    doy = (dates - dates.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.float64) + 1
    name = CROP_CLASSES[label]
    green, senesce, rise, fall, peak, base = _PHENOLOGY[name]
    params = (
        green + rng.normal(0, 5),
        senesce + rng.normal(0, 5),
        rise,
        fall,
        float(np.clip(peak + rng.normal(0, 0.05), 0.3, 0.98)),
        base,
    )
    shift = factors.phenology_shift_days
    v = _vegetation(doy, params, shift)  # (T,)
    soil = _SOIL * float(rng.normal(1.0, 0.08))
    mix = soil[None, :] * (1 - v[:, None]) + _VEG[None, :] * v[:, None]  # (T, C)
    if name == "rapeseed":
        bloom = np.exp(-0.5 * ((doy - 115.0 - shift) / 8.0) ** 2)
        mix = mix + bloom[:, None] * _FLOWER[None, :]
    gain = np.broadcast_to(np.asarray(factors.sensor_gain, dtype=np.float32), (len(S2_BANDS),))
    values = mix[:, :, None] * (1.0 + rng.normal(0, 0.04, size=(1, 1, pixels)))  # pixel vigour
    values = values + rng.normal(0, 0.008, size=(len(dates), len(S2_BANDS), pixels))
    values = values * gain[None, :, None]
    cloud = np.zeros((len(dates), pixels), dtype=bool)
    cloudy_dates = rng.random(len(dates)) < factors.cloud_rate
    for t in np.flatnonzero(cloudy_dates):
        cover = rng.random(pixels) < rng.uniform(0.5, 1.0)
        cloud[t] = cover
        values[t][:, cover] = rng.uniform(0.25, 0.6) + rng.normal(0, 0.02, size=(len(S2_BANDS), int(cover.sum())))
    return ParcelSeries(
        values=np.clip(values, 0.0, 1.5).astype(np.float32),
        dates=dates,
        cloud=cloud,
        label=label,
        parcel_id=parcel_id,
        region=factors.region,
    )


def generate_country(factors: CountryFactors, n_parcels: int, *, seed: int = 0, pixels: int = 16) -> list[ParcelSeries]:
    """``n_parcels`` seeded parcels of a country, classes drawn from its priors (same seed -> same parcels)."""
    rng = np.random.default_rng(_country_seed(factors, seed))
    prior = np.asarray(factors.class_prior, dtype=np.float64)
    if prior.shape != (len(CROP_CLASSES),) or prior.min() < 0 or prior.sum() <= 0:
        raise ValueError(f"class_prior={factors.class_prior}: expected {len(CROP_CLASSES)} non-negative shares")
    labels = rng.choice(len(CROP_CLASSES), size=n_parcels, p=prior / prior.sum())
    return [
        generate_parcel(factors, int(label), rng, parcel_id=f"P{i:06d}", pixels=pixels)
        for i, label in enumerate(labels)
    ]
