"""Selection benchmark, protocol: areas, tuning / report shift families, modes, and how the domains are made.

See bench/selection.py (the entry point) for the whole protocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from adapters.config import AdaptationConfig
from adapters.selection_calibration import TUNING_SHIFTS as CALIBRATION_SHIFTS
from adapters.selection_calibration import Shift
from bench import adaptation
from stream.config import DemoConfig
from stream.scenarios import DUBAI_SOURCES, Scenario
from terradapt.datasets.base import Sample, iter_patches
from terradapt.datasets.dubai import DubaiDataset
from terradapt.raster import RasterSpec

U8 = npt.NDArray[np.uint8]
#: draws a family's parameters for one domain (once) and returns the per-tile shift (its rng: sensor noise only)
Family = Callable[[np.random.Generator], Shift]

SOURCE_AREAS = (1, 2, 7, 8)
REPORT_AREAS = (3, 4, 5, 6)
#: calibration patches of the source areas (40 per area): the monitor's thresholds need ~150 (README)
CALIBRATION_TILES = 160
BATCHES = (1, 4)
SYSTEM_BATCH = AdaptationConfig().batch_size  # the system's default adaptation batch size (4)
SYSTEM_METHOD = AdaptationConfig().method  # the system's default method
SHOTS = (0, 1, 2, 4, 8)
#: Source training protocols of the few-shot curve (``terradapt.protocols``, default configs): one constant
PROTOCOLS: tuple[str, ...] = ("erm", "erm-aug", "irm", "reptile")
ROLLING = 4  # segments per rolling window of the long-stream check
WORSE = 0.005  # "worse than source" means more than 0.5 mIoU points below it
UNSHIFTED = "none"


# -- shift families --------------------------------------------------------------------------------------------
def _u8(x: npt.NDArray[np.floating]) -> U8:
    out: U8 = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def gamma_family(rng: np.random.Generator) -> Shift:
    """Non-linear tone curve ``255 (x / 255) ** g_b``: g = 0.6 (brighter shadows) or 1.6 (darker), +-12% per band."""
    base = 0.6 if rng.random() < 0.5 else 1.6
    exponents = base * (1.0 + rng.permutation(np.array([-0.12, 0.0, 0.12])))

    def apply(image: U8, rng: np.random.Generator) -> U8:
        g = np.resize(exponents, image.shape[0]).astype(np.float32)[:, None, None]
        return _u8(255.0 * (image.astype(np.float32) / 255.0) ** g)

    return apply


def vignette_family(rng: np.random.Generator) -> Shift:
    """Spatially varying illumination: radial or linear gradient down to 55% at the edge, and a colour tint."""
    radial = bool(rng.random() < 0.5)
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    tint = 1.0 + rng.uniform(-0.12, 0.12, size=3)
    floor = 0.55

    def apply(image: U8, rng: np.random.Generator) -> U8:
        c, h, w = image.shape
        yy, xx = np.meshgrid(np.linspace(-1.0, 1.0, h), np.linspace(-1.0, 1.0, w), indexing="ij")
        if radial:
            t = np.sqrt(xx**2 + yy**2) / np.sqrt(2.0)  # 0 at the centre, 1 in the corners
        else:
            p = xx * np.cos(angle) + yy * np.sin(angle)
            t = (p - p.min()) / max(float(p.max() - p.min()), 1e-9)  # 0 on the lit side, 1 on the dark one
        light = 1.0 - (1.0 - floor) * t
        band = np.resize(tint, c)[:, None, None]
        return _u8(image.astype(np.float64) * light[None] * band)

    return apply


def low_contrast_family(rng: np.random.Generator) -> Shift:
    """Contrast compressed toward a grey level (x0.40-0.55), desaturated (x0.3-0.5 chroma), sensor noise (5 DN)."""
    contrast = float(rng.uniform(0.40, 0.55))
    grey = float(rng.uniform(110.0, 150.0))
    saturation = float(rng.uniform(0.3, 0.5))

    def apply(image: U8, rng: np.random.Generator) -> U8:
        x = grey + contrast * (image.astype(np.float32) - grey)
        luminance = x.mean(axis=0, keepdims=True)
        x = luminance + saturation * (x - luminance)
        return _u8(x + rng.normal(0.0, 5.0, x.shape).astype(np.float32))

    return apply


#: Report families: none of them is in the tuning set (tests/bench/test_selection_bench.py checks the images).
REPORT_SHIFTS: dict[str, Family] = {
    "gamma": gamma_family,
    "vignette": vignette_family,
    "low-contrast": low_contrast_family,
}


def _constant(shift: Shift | None) -> Family | None:
    if shift is None:
        return None
    return lambda rng: shift


#: Tuning families: the selection estimator's calibration shifts ("none" is the identity).
TUNING_SHIFTS: dict[str, Family | None] = {name: _constant(s) for name, s in CALIBRATION_SHIFTS.items()}
#: Synthetic departements of the tuning set (bench/adaptation.py), by their acquisition presets.
TUNING_DEPARTEMENTS = tuple(adaptation.SYN_TARGETS)
TUNING_FAMILIES = [n for n in TUNING_SHIFTS if n != UNSHIFTED]


def conditions(area: int, tune: bool) -> tuple[str, ...]:
    """The shift families an area is streamed under: "none" and three families of its set."""
    if not tune:
        return (UNSHIFTED, *REPORT_SHIFTS)
    j = SOURCE_AREAS.index(area) % 2  # areas 1, 7: the first three tuning families; 2, 8: the other three
    return (UNSHIFTED, *TUNING_FAMILIES[3 * j : 3 * j + 3])


def family(name: str) -> Family | None:
    """The family of a report or tuning shift by name (None: unshifted)."""
    return REPORT_SHIFTS[name] if name in REPORT_SHIFTS else TUNING_SHIFTS[name]


def region_code(name: str, area: int) -> str:
    """A valid region code for one domain: ``dubai-3`` unshifted, ``gamma-3``, ``lowcontrast-3``..."""
    prefix = "dubai" if name == UNSHIFTED else "".join(ch for ch in name if ch.isalpha())
    return f"{prefix}-{area}"


def shifted(samples: Sequence[Sample], name: str, region: str, seed: int, area: int) -> list[Sample]:
    """The samples under a family, parameters drawn once for the domain, deterministic given (seed, area, name)."""
    fam = family(name)
    if fam is None:
        return [Sample(s.image, s.mask, region, s.tile_id, s.crs, s.transform) for s in samples]
    salt = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    rng = np.random.default_rng([seed, area, salt])
    shift = fam(rng)
    return [Sample(shift(s.image, rng), s.mask, region, f"{s.tile_id}-{name}", s.crs, s.transform) for s in samples]


# -- modes and data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """Sizes of one benchmark mode."""

    tile: int
    train_tiles: int
    train_steps: int
    stream: int
    held_out: int
    oracle_steps: int  # steps of the labelled oracle (few_shot_adapt with every stream label), 2-3x fewshot_steps
    cycles: int
    base_channels: int
    per_area: int  # domains per area ("none" + families in turn, so that every family is used)
    fewshot_domains: int  # domains of the few-shot curve (one per area, the conditions in turn)
    fewshot_steps: int  # optimiser steps of one few-shot fine-tune (FewShotConfig.steps, default 60)

    @property
    def base(self) -> adaptation.Mode:
        """The same sizes as bench/adaptation.py's mode (for its helpers)."""
        return adaptation.Mode(
            tile=self.tile,
            train_tiles=self.train_tiles,
            train_steps=self.train_steps,
            stream=self.stream,
            held_out=self.held_out,
            oracle_steps=self.oracle_steps,
            cycles=self.cycles,
            base_channels=self.base_channels,
        )


# --quick: 8 of the 16 domains (each area as is and under one family, every family used), short streams, 2 few-shot
# domains, few steps everywhere. Measured from scratch on the shared 2 cores, 1 thread: 6.8 min (data 0.1, 4 source
# models 1.8, few-shot 0.6, selection calibration 0.8, methods + oracle + estimates 1.6 (12 s a domain), system
# 0.8, long stream 1.1); about 5 with the source models cached.
QUICK = Mode(
    tile=96, train_tiles=16, train_steps=200, stream=12, held_out=8, oracle_steps=40, cycles=2, base_channels=8,
    per_area=2, fewshot_domains=2, fewshot_steps=15,
)  # fmt: skip
# Full, sized from those stage times (same 96 px tiles; at 128 px every stage costs ~1.8x and the total would not
# fit): source models x3 (600 steps) = 5.4 min; few-shot 4 domains x 4 protocols x 4 K x 60 steps = 3840 steps at
# ~0.075 s = 5 min; selection calibration unchanged (same 160 calibration tiles) = 0.8; per domain 32 stream tiles
# (0.75 s a tile for the 8 methods x 2 batches) + 120 oracle steps = ~33 s, x 16 domains = 9 min; system 512 tiles
# ~2 min; long stream 10 cycles x 512 tiles at ~0.135 s (jobs and evaluations included) = 11.5 min. About 35 min
# on a quiet machine, ~50 with the CPU shared as in the quick run (72% of a core): inside the 60 minutes.
FULL = Mode(
    tile=96, train_tiles=32, train_steps=600, stream=32, held_out=12, oracle_steps=120, cycles=10, base_channels=8,
    per_area=4, fewshot_domains=4, fewshot_steps=60,
)  # fmt: skip


@dataclass(frozen=True)
class Domain:
    """One evaluated domain: region code, area (or departement), shift family, and which set it belongs to."""

    region: str
    area: str
    shift: str
    tuning: bool

    @property
    def shifted(self) -> bool:
        return self.shift != UNSHIFTED


def rotate(names: Sequence[str], index: int, count: int) -> list[str]:
    """The first name ("none"), then ``count - 1`` of the others starting at the ``index``-th (in turn)."""
    others = names[1:]
    if count >= len(names):
        return list(names)
    return [names[0], *(others[(index + j) % len(others)] for j in range(count - 1))]


def domain_plan(mode: Mode, tune: bool) -> list[tuple[int, str]]:
    """(area, family) of every domain of the set in this mode; with fewer than 4 per area the families rotate."""
    areas = SOURCE_AREAS if tune else REPORT_AREAS
    return [(area, n) for i, area in enumerate(areas) for n in rotate(conditions(area, tune), i, mode.per_area)]


def fewshot_domains(domains: Sequence[Domain], count: int) -> list[Domain]:
    """The few-shot curve's domains: one per area, its i-th condition for the i-th area (all 16: dubai-3, gamma-4,
    vignette-5, lowcontrast-6: every area and every condition once)."""
    areas = list(dict.fromkeys(d.area for d in domains))
    out = []
    for i, area in enumerate(areas[:count]):
        mine = [d for d in domains if d.area == area]
        out.append(mine[i % len(mine)])
    return out


def dubai_set(mode: Mode, seed: int, tune: bool) -> tuple[Scenario, list[Domain]]:
    """Source training + calibration tiles and the domains of the report (or tuning) set."""
    ds = DubaiDataset()
    rng = np.random.default_rng(seed)

    def patches(area: int) -> list[Sample]:  # the order of stream.scenarios.dubai_scenario (same training tiles)
        out: list[Sample] = []
        for t in ds.tile_ids(f"dubai-{area}"):
            out.extend(iter_patches(ds.load(f"dubai-{area}", t), mode.tile))
        return [out[i] for i in rng.permutation(len(out))]

    sc = Scenario(
        "Dubai tuning set" if tune else "Dubai report set",
        ds.classes,
        ds.band_names,
        RasterSpec(band_count=3, require_crs=False),
        [],
        [],
        source_regions=DUBAI_SOURCES,
    )
    n_cal, n_dom = CALIBRATION_TILES // len(SOURCE_AREAS), mode.stream + mode.held_out
    base: dict[int, list[Sample]] = {}
    for area in SOURCE_AREAS:
        tiles = patches(area)
        sc.train += tiles[: mode.train_tiles]
        sc.calibration += tiles[mode.train_tiles : mode.train_tiles + n_cal]
        base[area] = tiles[mode.train_tiles + n_cal : mode.train_tiles + n_cal + n_dom]
    if not tune:
        base = {area: patches(area)[:n_dom] for area in REPORT_AREAS}
    domains = []
    for area, name in domain_plan(mode, tune):
        region = region_code(name, area)
        tiles = shifted(base[area], name, region, seed, area)
        sc.streams[region], sc.held_out[region] = tiles[: mode.stream], tiles[mode.stream :]
        sc.shift[region] = name
        domains.append(Domain(region, str(area), name, tune))
    return sc, domains


def synthetic_set(mode: Mode, seed: int) -> tuple[Scenario, list[Domain]]:
    """The synthetic departements of bench/adaptation.py (tuning set only); D029 has no radiometric shift."""
    sc = adaptation.synthetic(mode.base, seed)
    domains = [Domain(r, r, UNSHIFTED if r == "D029" else sc.shift[r], True) for r in sc.streams]
    return sc, domains


def demo_config(mode: Mode, seed: int, dataset: str) -> DemoConfig:
    """The source model's configuration: the same cache key as bench/adaptation.py for the same sizes."""
    return DemoConfig.model_validate(
        {
            "dataset": dataset,
            "tile_size": mode.tile,
            "train_tiles": mode.train_tiles,
            "train_steps": mode.train_steps,
            "base_channels": mode.base_channels,
            "cache_dir": Path(".terradapt/bench"),
            "seed": seed,
        }
    )


# -- small helpers shared by the other selection modules -------------------------------------------------------
def tensor(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.image for s in samples])).float()


def sample_masks(samples: Sequence[Sample]) -> list[U8]:
    return [s.mask for s in samples if s.mask is not None]


def avg(values: Sequence[float]) -> float:
    """Mean of the values (NaN for none)."""
    return float(np.mean(values)) if len(values) else float("nan")
