"""Seeded synthetic FLAIR scenes with controlled domain shift per departement.

Real FLAIR-1 is ~90 GB and not available here, yet terradapt needs labelled 5-band tiles from several regions
whose shifts are *known*: a drift detector or an adapter can only be judged against a shift we control. This
module draws spatially coherent land-cover layouts (parcels, hedges, forests, water, roads, buildings with
gardens and shadows), renders them with per-class spectral signatures and textures, then passes them through a
physically ordered "acquisition" (season, illumination, haze, blur, sensor gain/offset, noise) described by
`DomainFactors`. Label shift is controlled separately by `DomainFactors.class_prior`.

Everything is vectorised numpy: a 512 x 512 scene takes a few tens of milliseconds.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
from affine import Affine

from terradapt.augment import gaussian_blur
from terradapt.classes import FLAIR_BANDS, FLAIR_CLASSES, flair_to_13
from terradapt.datasets.base import Sample
from terradapt.errors import UnknownRegionError
from terradapt.raster import Raster, write_geotiff

__all__ = [
    "CRS",
    "DEPARTEMENTS",
    "PIXEL_SIZE",
    "DomainFactors",
    "SyntheticDataset",
    "generate_scene",
    "shift_image",
    "write_flair_dataset",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

CRS = "EPSG:2154"
PIXEL_SIZE = 0.2  # metres, as FLAIR-1
ZONE_TILES = 16  # tiles per zone folder, laid out on a 4 x 4 grid
_ZONE_SPACING = 5_000.0  # metres between zone origins (zones do not overlap)

# Raw FLAIR labels drawn by the generator.
BUILDING, PERVIOUS, IMPERVIOUS, BARE, WATER, CONIFER, DECIDUOUS, BRUSH = 1, 2, 3, 4, 5, 6, 7, 8
VINEYARD, HERB, AGRI, PLOWED, POOL = 9, 10, 11, 12, 13


@dataclass(frozen=True)
class DomainFactors:
    """How a region's acquisitions differ from the source: radiometry, season, optics and class mix.

    Attributes:
        gain: Per-band multiplier (R, G, B, NIR, elevation) of the sensor / processing chain.
        offset: Per-band additive offset in digital numbers.
        illumination: Global irradiance multiplier (sun height, clouds) on the optical bands.
        season: Phenology in [-1, 1]: 0 is the source (early summer), < 0 towards leaf-off and bare fields,
            > 0 towards peak greenness. Changes what vegetation looks like, not the labels.
        haze: Atmospheric haze in [0, 1]: additive path radiance (strongest in blue) and contrast loss.
        blur_sigma: Gaussian blur of the optical bands in pixels (defocus, resampling, motion).
        noise_std: Sensor noise standard deviation in digital numbers.
        class_prior: Raw FLAIR label -> multiplier of the area that class takes (label shift); 1 if absent.
        description: Why this domain exists; shown in reports, not part of equality.

    """

    gain: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    offset: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)
    illumination: float = 1.0
    season: float = 0.0
    haze: float = 0.0
    blur_sigma: float = 0.0
    noise_std: float = 2.0
    class_prior: Mapping[int, float] = field(default_factory=dict, hash=False)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        checks = {
            "gain": len(self.gain) == 5,
            "offset": len(self.offset) == 5,
            "illumination": self.illumination > 0,
            "season": -1.0 <= self.season <= 1.0,
            "haze": 0.0 <= self.haze <= 1.0,
            "blur_sigma": self.blur_sigma >= 0,
            "noise_std": self.noise_std >= 0,
            "class_prior": all(1 <= k <= 19 and v >= 0 for k, v in self.class_prior.items()),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DomainFactors.{name}={getattr(self, name)!r} is out of range")
        object.__setattr__(self, "gain", tuple(float(g) for g in self.gain))
        object.__setattr__(self, "offset", tuple(float(o) for o in self.offset))
        object.__setattr__(self, "class_prior", MappingProxyType(dict(self.class_prior)))

    def prior(self, label: int) -> float:
        """Area multiplier of a raw label (1.0 when not set)."""
        return float(self.class_prior.get(label, 1.0))


DEPARTEMENTS: dict[str, DomainFactors] = {
    "D033": DomainFactors(
        description="Gironde, the source domain: neutral radiometry and the reference class mix. Models are "
        "trained here."
    ),
    "D040": DomainFactors(
        gain=(1.01, 0.99, 1.0, 1.01, 1.0),
        offset=(1.0, 0.0, -1.0, 0.5, 0.0),
        noise_std=2.2,
        description="Landes, a second source-like domain: another flight of the same sensor, differences "
        "within noise. A negative control: detectors must stay quiet and adapters must not hurt.",
    ),
    "D013": DomainFactors(
        gain=(1.18, 1.08, 0.90, 0.82, 1.0),
        offset=(14.0, 10.0, 18.0, -8.0, 0.0),
        illumination=1.12,
        haze=0.35,
        description="Bouches-du-Rhone: strong covariate shift from another camera calibration (per-band "
        "gain/offset) plus Mediterranean haze and sun, with the source labels. Re-estimating normalisation "
        "statistics should recover most of the accuracy.",
    ),
    "D067": DomainFactors(
        season=-0.7,
        illumination=0.72,
        blur_sigma=1.2,
        noise_std=3.0,
        description="Bas-Rhin: early-spring flight (leaf-off trees, bare-looking fields) under low sun with "
        "slight defocus. Season changes what classes look like, a harder shift than a calibration.",
    ),
    "D029": DomainFactors(
        class_prior={
            WATER: 4.0,
            CONIFER: 2.0,
            DECIDUOUS: 2.0,
            BRUSH: 1.5,
            AGRI: 0.5,
            PLOWED: 0.5,
            BUILDING: 0.7,
        },
        description="Finistere: label shift only (coast, bocage and woods: much more water and forest) with "
        "source radiometry. Pixel-statistics detectors should barely move while prediction-share drift does.",
    ),
    "D074": DomainFactors(
        gain=(1.06, 1.06, 1.10, 0.95, 1.0),
        offset=(8.0, 8.0, 10.0, 0.0, 0.0),
        illumination=1.15,
        class_prior={CONIFER: 2.5, DECIDUOUS: 1.3, AGRI: 0.4, PLOWED: 0.4, VINEYARD: 0.1, BUILDING: 0.6},
        description="Haute-Savoie, mountain: more coniferous forest and few crops (label shift) with bright, "
        "snow-lit scenes and a mild gain shift (covariate shift): the mixed case.",
    ),
}

#: Approximate Lambert-93 (EPSG:2154) origins, so that tiles land in their departement on a map.
_ORIGINS: dict[str, tuple[float, float]] = {
    "D033": (417_000.0, 6_425_000.0),  # Bordeaux
    "D040": (418_000.0, 6_318_000.0),  # Mont-de-Marsan
    "D013": (893_000.0, 6_247_000.0),  # Marseille
    "D067": (1_050_000.0, 6_841_000.0),  # Strasbourg
    "D029": (171_000.0, 6_789_000.0),  # Quimper
    "D074": (940_000.0, 6_540_000.0),  # Annecy
}

# --- Spectral model ---------------------------------------------------------------------------------------
# Reflectance-like values in [0, 1] for (R, G, B, NIR), indexed by raw label: vegetation is dark in red and
# bright in NIR, water is dark in NIR, bare surfaces are flat and bright.
_SIGNATURE = np.full((20, 4), 0.4, dtype=np.float32)
for _label, _sig in {
    BUILDING: (0.52, 0.45, 0.42, 0.45),
    PERVIOUS: (0.28, 0.36, 0.22, 0.55),
    IMPERVIOUS: (0.36, 0.36, 0.37, 0.33),
    BARE: (0.56, 0.48, 0.40, 0.50),
    WATER: (0.10, 0.17, 0.20, 0.05),
    CONIFER: (0.11, 0.19, 0.13, 0.42),
    DECIDUOUS: (0.17, 0.30, 0.16, 0.66),
    BRUSH: (0.24, 0.32, 0.20, 0.52),
    VINEYARD: (0.36, 0.40, 0.27, 0.53),
    HERB: (0.30, 0.44, 0.24, 0.62),
    AGRI: (0.33, 0.47, 0.26, 0.70),
    PLOWED: (0.44, 0.36, 0.29, 0.36),
    POOL: (0.28, 0.62, 0.72, 0.10),
}.items():
    _SIGNATURE[_label] = _sig
_SIGNATURE_T = np.ascontiguousarray(_SIGNATURE.T)
_VINE = np.array([0.22, 0.36, 0.18, 0.62], dtype=np.float32)
_VINE_SOIL = np.array([0.50, 0.44, 0.36, 0.44], dtype=np.float32)
#: Terracotta, slate, concrete, zinc, dark membrane.
_ROOFS = np.array(
    [
        [0.62, 0.36, 0.30, 0.42],
        [0.30, 0.31, 0.34, 0.30],
        [0.70, 0.68, 0.66, 0.60],
        [0.50, 0.50, 0.52, 0.46],
        [0.22, 0.22, 0.24, 0.22],
    ],
    dtype=np.float32,
)


def _lut(values: Mapping[int, float], default: float = 0.0) -> F32:
    table = np.full(20, default, dtype=np.float32)
    for label, value in values.items():
        table[label] = value
    return table


#: Per-parcel colour variation (crop variety, growth stage); only for parcel-based classes.
_PARCEL_VAR = _lut({BARE: 0.6, VINEYARD: 0.5, HERB: 0.8, AGRI: 1.3, PLOWED: 0.8})
#: Fine texture amplitude (grass, soil clods, asphalt grain) and crown texture amplitude (tree crowns).
_FINE_TEX = _lut(
    {
        PERVIOUS: 0.12,
        IMPERVIOUS: 0.05,
        BARE: 0.08,
        WATER: 0.03,
        HERB: 0.08,
        AGRI: 0.06,
        PLOWED: 0.08,
        VINEYARD: 0.05,
        BUILDING: 0.03,
        POOL: 0.02,
    },
    0.05,
)
_CROWN_TEX = _lut({CONIFER: 0.32, DECIDUOUS: 0.25, BRUSH: 0.2, PERVIOUS: 0.08})
#: Sensitivity to phenology, and how much a class browns towards plowed soil in the dormant season.
_VEGETATION = _lut({PERVIOUS: 0.5, CONIFER: 0.2, DECIDUOUS: 1.2, BRUSH: 0.7, VINEYARD: 0.9, HERB: 0.8, AGRI: 1.1})
_BROWNING = _lut({DECIDUOUS: 0.35, VINEYARD: 0.5, HERB: 0.3, AGRI: 0.7})
_SEASON_SHIFT = np.array([-0.06, 0.02, -0.02, 0.20], dtype=np.float32)  # greener: less red, much more NIR
#: Height above ground (m) and its textured variation, for the elevation band.
_HEIGHT = _lut({CONIFER: 18.0, DECIDUOUS: 15.0, BRUSH: 2.5, VINEYARD: 0.8, AGRI: 0.6, HERB: 0.2})
_HEIGHT_TEX = _lut({CONIFER: 4.0, DECIDUOUS: 3.5, BRUSH: 1.0, AGRI: 0.1})
#: Haze path radiance per optical band (R, G, B, NIR), as a fraction of full scale: Rayleigh scattering is
#: strongest at short wavelengths.
_PATH_RADIANCE = np.array([0.20, 0.23, 0.30, 0.12], dtype=np.float32)


# --- Random fields ----------------------------------------------------------------------------------------


def _lerp_axis(values: F32, size: int, spacing: float, shift: float, axis: int) -> F32:
    """Upsample bilinearly along one axis, from grid points `spacing` pixels apart to `size` pixels."""
    position = (np.arange(size) + shift) / spacing
    low = np.floor(position).astype(np.intp)
    frac = (position - low).astype(np.float32)
    shape = (-1, 1) if axis == 0 else (1, -1)
    before: F32 = np.take(values, low, axis=axis)
    after: F32 = np.take(values, low + 1, axis=axis)
    out: F32 = before * (1 - frac).reshape(shape) + after * frac.reshape(shape)
    return out


def _fft_friendly(n: int) -> int:
    """Return the smallest m >= n without prime factors above 5 (FFTs of other sizes are much slower)."""
    while True:
        m = n
        for prime in (2, 3, 5):
            while m % prime == 0:
                m //= prime
        if m == 1:
            return n
        n += 1


def _field(rng: np.random.Generator, size: int, scale: float) -> F32:
    """Draw a smooth random field (zero mean, unit variance) with features about `scale` pixels wide.

    Gaussian-filtered white noise on a coarse grid (spacing ~scale/4, filtered by FFT), bilinearly upsampled
    one axis at a time: far cheaper than filtering at full resolution, smooth enough that thresholded contours
    look natural, and free of BLAS (whose threading is slow and machine-dependent on small matrices).
    Pixel-scale texture (scale <= 2) is uniform noise summed over 2 x 2 neighbours instead, which is cheaper
    still and looks the same.
    """
    if scale <= 2:
        noise = rng.random((size + 1, size + 1), dtype=np.float32)
        out: F32 = noise[:-1, :-1] + noise[1:, :-1] + noise[:-1, 1:] + noise[1:, 1:]
    else:
        spacing = max(scale / 4, 3.0)
        coarse = _fft_friendly(int(np.ceil(size / spacing)) + 8)
        sigma = scale / spacing / 2
        freq_y = np.fft.fftfreq(coarse)[:, None]
        freq_x = np.fft.rfftfreq(coarse)[None, :]
        transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (freq_x**2 + freq_y**2))
        noise = rng.standard_normal((coarse, coarse), dtype=np.float32)
        smooth = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=noise.shape).astype(np.float32)
        rows = _lerp_axis(smooth, size, spacing, rng.uniform(0, spacing), axis=0)
        out = _lerp_axis(rows, size, spacing, rng.uniform(0, spacing), axis=1)
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


def _top(values: F32, fraction: float) -> npt.NDArray[np.bool_]:
    """Pixels holding the highest `fraction` of a field (quantile estimated on a subsample, for speed)."""
    if fraction <= 0:
        return np.zeros(values.shape, dtype=bool)
    if fraction >= 1:
        return np.ones(values.shape, dtype=bool)
    return values > np.quantile(values[::4, ::4], 1.0 - fraction)


def _gaussian_lut() -> F32:
    """Compute standard normal quantiles at (i + 0.5) / 256 by bisection on math.erf (numpy has no erfinv)."""
    targets = (np.arange(256) + 0.5) / 256
    low, high = np.full(256, -6.0), np.full(256, 6.0)
    erf = np.vectorize(math.erf)
    for _ in range(40):
        mid = (low + high) / 2
        below = 0.5 * (1 + erf(mid / math.sqrt(2))) < targets
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    lut: npt.NDArray[np.float64] = (low + high) / 2
    standard: F32 = (lut / lut.std()).astype(np.float32)
    return standard


#: Sensor noise is drawn as random bytes mapped through normal quantiles: a 256-level Gaussian is
#: indistinguishable once quantised to uint8, and 10x cheaper than `standard_normal` for 5 full bands.
_GAUSSIAN_LUT = _gaussian_lut()


# --- Layout -----------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Label map plus the per-pixel attributes the renderer needs."""

    labels: U8
    parcel: npt.NDArray[np.int32]  # parcel id, for per-parcel colour
    across: F32  # coordinate across the parcel direction, for vine rows and furrows
    height: F32  # building heights in metres (0 elsewhere)
    roof: npt.NDArray[np.int8]  # roof material index, -1 outside buildings
    shade: F32  # multiplicative illumination: cast shadows, roof slopes
    n_parcels: int


def _rotated(size: int, angle: float) -> tuple[F32, F32]:
    """Coordinates along and across a direction, for every pixel."""
    y = np.arange(size, dtype=np.float32)[:, None]
    x = np.arange(size, dtype=np.float32)[None, :]
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return x * cos + y * sin, y * cos - x * sin


def _parcels(rng: np.random.Generator, size: int, factors: DomainFactors) -> _Layout:
    """Lay out parcels: rotated strips cut into fields, one crop each, separated by margins and hedges."""
    along, across = _rotated(size, rng.uniform(0, np.pi))
    strip_width = rng.uniform(0.2, 0.55) * size
    n_strips = int(4 * size / strip_width) + 2
    strip = ((across + 2 * size) / strip_width).astype(np.int32)
    lengths = (rng.uniform(0.35, 1.2, n_strips) * size).astype(np.float32)
    shifts = (rng.uniform(0, 1, n_strips) * lengths).astype(np.float32)
    parcel = strip * 16 + ((along + 2 * size + shifts[strip]) / lengths[strip]).astype(np.int32)
    crops = np.array([VINEYARD, HERB, AGRI, PLOWED])
    weights = np.array([0.08, 0.25, 0.45, 0.22]) * [factors.prior(int(c)) for c in crops]
    crop_of = rng.choice(crops, size=n_strips * 16, p=weights / weights.sum()).astype(np.uint8)
    labels = crop_of[parcel]
    for width, label, share in ((rng.integers(2, 5), HERB, 1.0), (rng.integers(8, 15), BRUSH, 0.3)):
        edge = np.zeros((size, size), dtype=bool)
        edge[width:] |= parcel[width:] != parcel[:-width]
        edge[:, width:] |= parcel[:, width:] != parcel[:, :-width]
        if label == BRUSH:  # hedgerows follow only some parcel borders
            edge &= _top(_field(rng, size, size / 6), min(1.0, share * factors.prior(BRUSH)))
        labels[edge] = label
    return _Layout(
        labels=labels,
        parcel=parcel,
        across=across,
        height=np.zeros((size, size), dtype=np.float32),
        roof=np.full((size, size), -1, dtype=np.int8),
        shade=np.ones((size, size), dtype=np.float32),
        n_parcels=n_strips * 16,
    )


def _nature(rng: np.random.Generator, layout: _Layout, factors: DomainFactors, urban: float) -> None:
    """Bare soil patches, then forests with brushwood edges."""
    labels, size = layout.labels, layout.labels.shape[0]
    bare = _top(_field(rng, size, size / 10), 0.04 * factors.prior(BARE) * rng.uniform(0, 2))
    labels[bare & (labels >= VINEYARD)] = BARE
    tree_prior = (factors.prior(CONIFER) + factors.prior(DECIDUOUS)) / 2
    forest_share = min(0.97, rng.beta(0.5, 1.6) * tree_prior * (1 - 0.7 * urban))
    forest_field = _field(rng, size, size / 6)
    forest = _top(forest_field, forest_share)
    brush_share = forest_share * 0.25 * factors.prior(BRUSH)
    labels[_top(forest_field, min(1.0, forest_share + brush_share)) & ~forest] = BRUSH
    conifer_weight = 0.35 * factors.prior(CONIFER)
    conifer_share = conifer_weight / (conifer_weight + 0.65 * factors.prior(DECIDUOUS) + 1e-9)
    conifer = _top(_field(rng, size, size / 5), conifer_share)
    labels[forest] = np.where(conifer[forest], CONIFER, DECIDUOUS)


def _water(rng: np.random.Generator, layout: _Layout, factors: DomainFactors) -> None:
    """Sometimes a lake (a smooth blob), sometimes a meandering river; more often where water is favoured."""
    labels, size = layout.labels, layout.labels.shape[0]
    water_prior = factors.prior(WATER)
    if rng.random() < min(0.9, 0.12 * water_prior):
        labels[_top(_field(rng, size, size / 4), rng.uniform(0.05, 0.35))] = WATER
    if rng.random() < min(0.9, 0.10 * water_prior):
        along, across = _rotated(size, rng.uniform(0, np.pi))
        centre = float(across[size // 2, size // 2]) + rng.uniform(-0.3, 0.3) * size
        meander = rng.uniform(0.05, 0.2) * size * np.sin(2 * np.pi * along / (rng.uniform(0.8, 2) * size))
        labels[np.abs(across - centre - meander) < rng.uniform(5, 20)] = WATER


def _rectangle(
    size: int, cy: float, cx: float, half_len: float, half_dep: float, angle: float, reach: float = 0.0
) -> tuple[slice, slice, F32, F32]:
    """Local coordinates (along, across) of a rotated rectangle's bounding box, grown by `reach` pixels."""
    radius = np.hypot(half_len, half_dep) + reach + 1
    r0, r1 = max(0, int(cy - radius)), min(size, int(cy + radius) + 1)
    c0, c1 = max(0, int(cx - radius)), min(size, int(cx + radius) + 1)
    y = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(cy)
    x = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(cx)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return slice(r0, r1), slice(c0, c1), x * cos + y * sin, y * cos - x * sin


def _urban(rng: np.random.Generator, layout: _Layout, factors: DomainFactors, urban: float) -> None:
    """Roads, then buildings along them with gardens (pervious or sealed), pools and cast shadows."""
    labels, size = layout.labels, layout.labels.shape[0]
    roads = []
    y = np.arange(size, dtype=np.float32)[:, None]
    x = np.arange(size, dtype=np.float32)[None, :]
    for _ in range(rng.poisson((0.4 + 2.0 * urban) * factors.prior(IMPERVIOUS))):
        angle, width = rng.uniform(0, np.pi), rng.uniform(8, 20)
        py, px = rng.uniform(0.1, 0.9, 2) * size
        distance = np.abs((x - px) * np.float32(np.sin(angle)) - (y - py) * np.float32(np.cos(angle)))
        roads.append((py, px, angle, width, distance < width / 2))
    road_mask = np.zeros((size, size), dtype=bool)
    for *_, mask in roads:
        road_mask |= mask
    sun = rng.uniform(-0.5, 0.5) - np.pi / 2  # shadows point roughly north (up) at noon
    shadow_per_metre = 1.0 / np.tan(rng.uniform(np.radians(40), np.radians(60))) / PIXEL_SIZE
    n_buildings = rng.poisson(urban * (12 if roads else 3) * factors.prior(BUILDING))
    for _ in range(n_buildings):
        half_len, half_dep, garden = rng.uniform(10, 30), rng.uniform(9, 22), rng.uniform(6, 18)
        if roads:
            py, px, angle, width, _mask = roads[rng.integers(len(roads))]
            t, side = rng.uniform(-size, size), rng.choice([-1.0, 1.0])
            offset = side * (width / 2 + rng.uniform(4, 16) + garden + half_dep)
            cy = py + t * np.sin(angle) + offset * np.cos(angle)
            cx = px + t * np.cos(angle) - offset * np.sin(angle)
        else:  # farm buildings scattered in the fields
            cy, cx = rng.uniform(0, size), rng.uniform(0, size)
            angle, side = rng.uniform(0, np.pi), 1.0
        if not (0 <= cy < size and 0 <= cx < size):
            continue
        height = rng.uniform(3, 12)
        length = height * shadow_per_metre
        reach = length + garden
        rows, cols, along, across = _rectangle(size, cy, cx, half_len, half_dep, angle, reach)
        footprint = (np.abs(along) < half_len) & (np.abs(across) < half_dep)
        blocked = road_mask[rows, cols] | (labels[rows, cols] == WATER)
        if not footprint.any() or (blocked & footprint).any():
            continue  # no building on a road or in water
        yard = (np.abs(along) < half_len + garden) & (np.abs(across) < half_dep + garden)
        free = yard & ~road_mask[rows, cols] & (labels[rows, cols] != BUILDING)
        labels[rows, cols][free] = PERVIOUS if rng.random() < 0.7 else IMPERVIOUS
        if rng.random() < 0.2 and garden > 10:  # a pool behind the house, away from the road
            pool = (np.abs(along) < min(half_len, 10)) & (np.abs(across - side * (half_dep + garden / 2)) < 5)
            labels[rows, cols][pool & free] = POOL
        shadow = np.zeros_like(footprint)
        dy, dx = np.sin(sun) * length, np.cos(sun) * length
        cos, sin = np.cos(angle), np.sin(angle)
        for step in np.linspace(0.0, 1.0, 2 + int(length // 3))[1:]:  # sweep the footprint along the sun
            sy, sx = step * dy, step * dx
            shifted_along = along - np.float32(sx * cos + sy * sin)
            shifted_across = across - np.float32(sy * cos - sx * sin)
            shadow |= (np.abs(shifted_along) < half_len) & (np.abs(shifted_across) < half_dep)
        layout.shade[rows, cols][shadow & ~footprint] = 0.45
        labels[rows, cols][footprint] = BUILDING
        layout.height[rows, cols][footprint] = height
        layout.roof[rows, cols][footprint] = rng.integers(len(_ROOFS))
        # Pitched roofs: the two slopes catch the sun differently, a cue (with height) that tells roofs from roads.
        layout.shade[rows, cols][footprint] = np.where(across[footprint] > 0, 1.08, 0.88)
    labels[road_mask] = IMPERVIOUS


# --- Rendering --------------------------------------------------------------------------------------------


def _reflectance(rng: np.random.Generator, layout: _Layout, season: float) -> tuple[F32, F32]:
    """Scene reflectance (4, H, W) after phenology, and height above ground (H, W) in metres."""
    labels, size = layout.labels, layout.labels.shape[0]
    index = labels.astype(np.intp)

    def lookup(table: F32) -> F32:
        return np.take(table, index, axis=-1)  # one entry per raw label; much faster than table[labels]

    refl = lookup(_SIGNATURE_T)
    tones = rng.normal(0, 0.035, (4, layout.n_parcels)).astype(np.float32)
    refl += np.take(tones, layout.parcel, axis=1) * lookup(_PARCEL_VAR)
    vine = labels == VINEYARD
    rows = (0.5 + 0.5 * np.cos(2 * np.pi * layout.across[vine] / 9.0)) ** 2  # vine rows every ~1.8 m
    refl[:, vine] = _VINE_SOIL[:, None] + (_VINE - _VINE_SOIL)[:, None] * rows
    plowed = labels == PLOWED
    refl[:, plowed] *= 1 + 0.08 * np.cos(2 * np.pi * layout.across[plowed] / 4.0)  # furrows
    built = layout.roof >= 0
    refl[:, built] = _ROOFS.T[:, layout.roof[built]]
    fine, crown = _field(rng, size, 1.5), _field(rng, size, 10.0)  # crowns ~2 m
    refl *= 1 + lookup(_FINE_TEX) * fine + lookup(_CROWN_TEX) * crown
    if season:
        refl += _SEASON_SHIFT[:, None, None] * (season * lookup(_VEGETATION))
        if season < 0:
            brown = lookup(_BROWNING) * -season
            refl += brown * (_SIGNATURE[PLOWED][:, None, None] - refl)
    refl *= layout.shade
    height = lookup(_HEIGHT) + lookup(_HEIGHT_TEX) * crown + layout.height
    height[vine] *= rows
    return refl, height


def shift_image(
    image: npt.NDArray[Any],
    factors: DomainFactors,
    rng: np.random.Generator,
    *,
    optical_bands: int | None = None,
) -> U8:
    """Apply an acquisition to an image, in physical order, and quantise it to uint8.

    Illumination, then haze (added path radiance, lost contrast), then optical blur act on the optical bands
    only; then per-band sensor gain/offset and noise act on every band. Works on synthetic reflectance scaled
    to digital numbers as well as on real uint8 imagery (e.g. the Dubai RGB tiles).

    Args:
        image: Array (C, H, W) in digital numbers (0..255 scale), C <= 5, bands ordered R, G, B, NIR, extra.
        factors: The acquisition; gain/offset entries beyond C are ignored. `season` and `class_prior` need
            labels and are ignored here.
        rng: Source of the sensor noise.
        optical_bands: How many leading bands are optical (default: up to 4).

    Returns:
        The shifted image, uint8.

    """
    out = image.astype(np.float32)
    count = out.shape[0]
    optical = min(count, 4) if optical_bands is None else optical_bands
    light = out[:optical]
    light *= factors.illumination
    if factors.haze:
        light *= 1 - 0.45 * factors.haze
        light += (255 * factors.haze * _PATH_RADIANCE[:optical])[:, None, None]
    if factors.blur_sigma > 0:
        out[:optical] = gaussian_blur(light, factors.blur_sigma)
    out *= np.asarray(factors.gain[:count], dtype=np.float32)[:, None, None]
    out += np.asarray(factors.offset[:count], dtype=np.float32)[:, None, None]
    if factors.noise_std > 0:
        noise_bytes = np.frombuffer(rng.bytes(out.size), dtype=np.uint8).reshape(out.shape)
        out += np.take(_GAUSSIAN_LUT * np.float32(factors.noise_std), noise_bytes)
    return np.rint(np.clip(out, 0, 255, out=out)).astype(np.uint8)


def generate_scene(
    rng: np.random.Generator, size: int, factors: DomainFactors, *, urban: float | None = None
) -> tuple[U8, U8]:
    """Draw one FLAIR-like scene.

    Args:
        rng: Source of all randomness (same generator state, same scene).
        size: Height and width in pixels (0.2 m each).
        factors: Domain factors of the region (class mix and acquisition).
        urban: How built-up the scene is in [0, 1]; drawn at random when None.

    Returns:
        The image (5, size, size) uint8 with bands R, G, B, NIR, elevation, and the raw FLAIR labels
        (size, size) uint8 in 1..19.

    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    urban = float(rng.beta(0.8, 1.6)) if urban is None else float(np.clip(urban, 0.0, 1.0))
    # One generator per layer: a prior that changes how many draws one layer makes (an extra lake) must not
    # reshuffle the others, so the same seed gives the *same* scene in every domain, up to the shift itself.
    parcels, nature, water, built, render = (np.random.default_rng(s) for s in rng.integers(0, 2**62, size=5))
    layout = _parcels(parcels, size, factors)
    _nature(nature, layout, factors, urban)
    _water(water, layout, factors)
    _urban(built, layout, factors, urban)
    refl, height = _reflectance(render, layout, factors.season)
    elevation = 2.0 + 6.0 * height  # nDSM in digital numbers: ~6 DN per metre above ground
    scene = np.concatenate([refl * 255.0, elevation[None]], axis=0)
    return shift_image(scene, factors, rng), layout.labels


# --- Datasets ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TilePlan:
    region: str
    domain: str  # "D033_2021"
    zone: str  # "Z1_UA"
    tile_id: str  # "000001"
    index: int  # position of the tile in its region (seeds its pixels)
    transform: Affine
    urban: float  # built-up level of the zone


#: Zone kinds as in FLAIR folder names (U urban, A agricultural, N natural) and how built-up they are.
_ZONE_KINDS = {"UU": 0.85, "UA": 0.5, "AA": 0.15, "NN": 0.03}


def _region_key(region: str) -> int:
    return zlib.crc32(region.encode())


def _plan(
    tiles_per_region: Mapping[str, int], size: int, seed: int, year: int, presets: Mapping[str, DomainFactors]
) -> list[_TilePlan]:
    """Where every tile goes: ids unique across the dataset, zones of up to 16 tiles on a 4 x 4 grid."""
    plans, next_id = [], 1
    for region in sorted(tiles_per_region):
        if region not in presets:
            raise UnknownRegionError(region, list(presets))
        key = _region_key(region)
        x0, y0 = _ORIGINS.get(region, (650_000.0 + (key % 97) * 3_000.0, 6_650_000.0))
        n_tiles = tiles_per_region[region]
        zone_rng = np.random.default_rng([seed, key, 0])
        kinds = [str(k) for k in zone_rng.choice(list(_ZONE_KINDS), size=-(-n_tiles // ZONE_TILES))]
        for index in range(n_tiles):
            zone, position = divmod(index, ZONE_TILES)
            kind = kinds[zone]
            x = x0 + zone * _ZONE_SPACING + (position % 4) * size * PIXEL_SIZE
            y = y0 - (position // 4) * size * PIXEL_SIZE
            plans.append(
                _TilePlan(
                    region=region,
                    domain=f"{region}_{year}",
                    zone=f"Z{zone + 1}_{kind}",
                    tile_id=f"{next_id:06d}",
                    index=index,
                    transform=Affine(PIXEL_SIZE, 0.0, x, 0.0, -PIXEL_SIZE, y),
                    urban=_ZONE_KINDS[kind],
                )
            )
            next_id += 1
    return plans


def _render(plan: _TilePlan, size: int, seed: int, factors: DomainFactors) -> tuple[U8, U8]:
    """Pixels of a planned tile; they depend only on (seed, region, index), not on the other regions."""
    rng = np.random.default_rng([seed, _region_key(plan.region), plan.index + 1])
    urban = plan.urban + rng.normal(0, 0.1)
    return generate_scene(rng, size, factors, urban=urban)


def write_flair_dataset(
    root: str | Path,
    tiles_per_region: Mapping[str, int],
    size: int = 512,
    seed: int = 0,
    year: int = 2021,
    *,
    presets: Mapping[str, DomainFactors] = DEPARTEMENTS,
) -> list[Path]:
    """Write synthetic tiles in the exact FLAIR-1 layout, readable by `FlairDataset`.

    Files are `<root>/D0NN_<year>/Z<k>_<kind>/img/IMG_<id>.tif` (5 bands, EPSG:2154) and
    `.../msk/MSK_<id>.tif` (raw labels 1..19). Tiles of a zone are adjacent on a 4 x 4 grid. The same
    arguments give the same bytes.

    Args:
        root: Output folder.
        tiles_per_region: Number of tiles per region code (keys of `presets`).
        size: Tile side in pixels.
        seed: Dataset seed.
        year: Acquisition year in the domain folder names.
        presets: Region code -> domain factors.

    Returns:
        The image paths, in tile-id order.

    Raises:
        UnknownRegionError: A region has no preset.

    """
    root = Path(root)
    images = []
    for plan in _plan(tiles_per_region, size, seed, year, presets):
        image, labels = _render(plan, size, seed, presets[plan.region])
        zone = root / plan.domain / plan.zone
        images.append(
            write_geotiff(
                zone / "img" / f"IMG_{plan.tile_id}.tif",
                Raster(image, CRS, plan.transform, band_names=FLAIR_BANDS),
            )
        )
        write_geotiff(zone / "msk" / f"MSK_{plan.tile_id}.tif", Raster(labels[None], CRS, plan.transform))
    return images


class SyntheticDataset:
    """The tiles `write_flair_dataset` would write, generated in memory on demand (a `TileDataset`).

    Same arguments, same tile ids, same pixels as the written dataset read back through `FlairDataset`;
    nothing is cached, so memory stays flat however many tiles are streamed.
    """

    classes: tuple[str, ...] = FLAIR_CLASSES
    band_names: tuple[str, ...] = FLAIR_BANDS

    def __init__(
        self,
        tiles_per_region: Mapping[str, int],
        size: int = 256,
        seed: int = 0,
        year: int = 2021,
        *,
        presets: Mapping[str, DomainFactors] = DEPARTEMENTS,
    ) -> None:
        self.size, self.seed, self.presets = size, seed, presets
        self._plans: dict[str, dict[str, _TilePlan]] = {region: {} for region in sorted(tiles_per_region)}
        for plan in _plan(tiles_per_region, size, seed, year, presets):
            self._plans[plan.region][plan.tile_id] = plan

    def regions(self) -> list[str]:
        """Region codes, sorted."""
        return list(self._plans)

    def tile_ids(self, region: str) -> list[str]:
        """Tile ids of a region, sorted."""
        if region not in self._plans:
            raise UnknownRegionError(region, list(self._plans))
        return list(self._plans[region])

    def load(self, region: str, tile_id: str) -> Sample:
        """Generate one tile with its mask mapped to the 13 classes."""
        plans = self._plans.get(region)
        if plans is None:
            raise UnknownRegionError(region, list(self._plans))
        if tile_id not in plans:
            raise KeyError(f"tile {tile_id!r} not in region {region!r}")
        plan = plans[tile_id]
        image, labels = _render(plan, self.size, self.seed, self.presets[region])
        return Sample(image, flair_to_13(labels), region, tile_id, CRS, plan.transform)
