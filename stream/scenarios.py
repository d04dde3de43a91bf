"""Scenarios: source training tiles, calibration tiles, and per-region streams with held-out labelled tiles.

Shared by the demo and the benchmarks: synthetic FLAIR-format departements, and the real Dubai aerial areas (with
radiometric shifts applied to real images). ``source_model`` trains a scenario's source model once and caches
it (safetensors + manifest) under ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from stream.config import DemoConfig
from stream.embedded import StreamItem
from terradapt.architectures import resolve_arch
from terradapt.checkpoint import ModelManifest, load_checkpoint, save_checkpoint
from terradapt.datasets.base import Sample, iter_patches
from terradapt.datasets.dubai import DubaiDataset
from terradapt.datasets.synthetic import DEPARTEMENTS, SyntheticDataset, shift_image
from terradapt.model import SegmentationModel
from terradapt.raster import Raster, RasterSpec, raster_to_geotiff_bytes
from terradapt.records import Acquisition
from terradapt.training import TrainConfig, evaluate, train_source_checkpoint


def tile_key(s: Sample) -> str:
    """The id a tile has in manifests and calibration data (``<region>/<tile id>``)."""
    return f"{s.region}/{s.tile_id}"


@dataclass
class Scenario:
    """Data of one demo: source training tiles, calibration tiles, and per-region streams + held-out tiles."""

    name: str
    classes: tuple[str, ...]
    bands: tuple[str, ...]
    spec: RasterSpec
    train: list[Sample]
    calibration: list[Sample]
    streams: dict[str, list[Sample]] = field(default_factory=dict)
    held_out: dict[str, list[Sample]] = field(default_factory=dict)
    shift: dict[str, str] = field(default_factory=dict)
    source_regions: tuple[str, ...] = ()


SYNTHETIC_SOURCES = ("D033", "D040")
SYNTHETIC_TARGETS = {
    "D033": "none (source departement)",
    "D013": "radiometric: gain/offset + haze",
    "D067": "season + illumination + blur",
    "D029": "label shift only",
}


def synthetic_scenario(cfg: DemoConfig) -> Scenario:
    """Source = D033 + D040; streamed = a source departement, two covariate shifts and one label shift."""
    n_src = cfg.train_tiles + cfg.calibration_tiles // 2
    n_tgt = cfg.stream_tiles + cfg.eval_tiles
    counts = {r: n_src for r in SYNTHETIC_SOURCES}
    counts["D033"] += n_tgt
    for r in SYNTHETIC_TARGETS:
        counts.setdefault(r, n_tgt)
    ds = SyntheticDataset(counts, size=cfg.tile_size, seed=cfg.seed)

    rng = np.random.default_rng(cfg.seed)

    def load(region: str) -> list[Sample]:
        # shuffled: tile ids are ordered by zone (urban, mixed, rural...), and every split must mix zones
        ids = ds.tile_ids(region)
        return [ds.load(region, ids[i]) for i in rng.permutation(len(ids))]

    by_region = {r: load(r) for r in counts}
    sc = Scenario("synthetic FLAIR-format departements", ds.classes, ds.band_names, RasterSpec.flair(), [], [])
    sc.source_regions = SYNTHETIC_SOURCES
    half = cfg.calibration_tiles // 2
    for r in SYNTHETIC_SOURCES:
        tiles = by_region[r]
        sc.train += tiles[: cfg.train_tiles]
        sc.calibration += tiles[cfg.train_tiles : cfg.train_tiles + half]
    for r, shift in SYNTHETIC_TARGETS.items():
        tiles = by_region[r][-n_tgt:]
        sc.streams[r] = tiles[: cfg.stream_tiles]
        sc.held_out[r] = tiles[cfg.stream_tiles :]
        sc.shift[r] = shift
    return sc


DUBAI_SOURCES = ("dubai-1", "dubai-2", "dubai-7", "dubai-8")


def dubai_scenario(cfg: DemoConfig) -> Scenario:
    """Real Dubai areas: train on areas 1, 2, 7, 8, then stream four regions.

    Area 2's held-out patches as-is (in distribution) and under haze + gain (a covariate shift applied to real
    images, region "dubai-9"), and areas 4 and 5 (real label shift: more buildings, more water).
    """
    ds = DubaiDataset()
    rng = np.random.default_rng(cfg.seed)

    def patches(region: str) -> list[Sample]:
        out: list[Sample] = []
        for t in ds.tile_ids(region):
            out.extend(iter_patches(ds.load(region, t), cfg.tile_size))
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    sc = Scenario(
        "real Dubai aerial areas",
        ds.classes,
        ds.band_names,
        RasterSpec(band_count=3, require_crs=False),
        [],
        [],
    )
    sc.source_regions = DUBAI_SOURCES
    n_cal = max(2, cfg.calibration_tiles // len(DUBAI_SOURCES))
    n_tgt = cfg.stream_tiles + cfg.eval_tiles
    held: list[Sample] = []
    for r in DUBAI_SOURCES:
        tiles = patches(r)
        sc.train += tiles[: cfg.train_tiles]
        sc.calibration += tiles[cfg.train_tiles : cfg.train_tiles + n_cal]
        if r == "dubai-2":
            held = tiles[cfg.train_tiles + n_cal : cfg.train_tiles + n_cal + n_tgt]
    k = min(cfg.stream_tiles, len(held) - 1)
    sc.streams["dubai-2"], sc.held_out["dubai-2"] = held[:k], held[k:]
    sc.shift["dubai-2"] = "none (source area)"
    hazy = [_shifted(s, "dubai-9", "D013", rng) for s in held]
    sc.streams["dubai-9"], sc.held_out["dubai-9"] = hazy[:k], hazy[k:]
    sc.shift["dubai-9"] = "area 2 under haze + gain (real images)"
    for r, shift in (("dubai-4", "label shift: buildings"), ("dubai-5", "label shift: water")):
        tiles = patches(r)[:n_tgt]
        k = min(cfg.stream_tiles, len(tiles) - 1)
        sc.streams[r], sc.held_out[r], sc.shift[r] = tiles[:k], tiles[k:], shift
    return sc


def scenario(cfg: DemoConfig) -> Scenario:
    """The scenario ``cfg.dataset`` names."""
    return synthetic_scenario(cfg) if cfg.dataset == "synthetic" else dubai_scenario(cfg)


def _shifted(s: Sample, region: str, preset: str, rng: np.random.Generator) -> Sample:
    factors = DEPARTEMENTS[preset]
    return Sample(shift_image(s.image, factors, rng), s.mask, region, s.tile_id + "-shifted", s.crs, s.transform)


def stream_item(region: str, index: int, s: Sample, bands: tuple[str, ...]) -> StreamItem:
    """One sample as the ``index``-th acquisition of ``region`` (a GeoTIFF in memory, one a minute)."""
    data = raster_to_geotiff_bytes(Raster(s.image, s.crs, s.transform, band_names=bands))
    tf = s.transform
    h, w = s.image.shape[1:]
    xs, ys = (tf.c, tf.c + tf.a * w), (tf.f, tf.f + tf.e * h)
    acq = Acquisition(
        id=f"{region}-{index:05d}",
        region=region,
        datetime=datetime(2024, 6, 1, tzinfo=UTC) + timedelta(minutes=index),
        bbox=(min(xs), min(ys), max(xs), max(ys)),
        crs=s.crs,
        bands=bands,
        href=f"memory://{region}/{s.tile_id}.tif",
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return StreamItem(acq, data, s.mask)


def acquisitions(streams: dict[str, list[Sample]], bands: tuple[str, ...]) -> Iterator[StreamItem]:
    """Round-robin over regions."""
    longest = max(len(v) for v in streams.values())
    for k in range(longest):
        for region, tiles in streams.items():
            if k < len(tiles):
                yield stream_item(region, k, tiles[k], bands)


def _cache_key(cfg: DemoConfig, sc: Scenario) -> str:
    key = json.dumps(
        {
            "dataset": cfg.dataset,
            "tile": cfg.tile_size,
            "train": cfg.train_tiles,
            "steps": cfg.train_steps,
            "seed": cfg.seed,
            "base": cfg.base_channels,
            "arch": cfg.arch,
            "calib": cfg.calibration_tiles,
            "v": 3,
            "tiles": [s.tile_id for s in sc.train],
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def source_model(
    cfg: DemoConfig,
    sc: Scenario,
    progress: Callable[[int, float], None] | None = None,
    device: str = "auto",
) -> tuple[SegmentationModel, ModelManifest, bool]:
    """Load the cached source model for this configuration, or train and cache it. Returns (model, manifest, cached)."""
    directory = cfg.cache_dir / f"source-{_cache_key(cfg, sc)}"
    if (directory / "manifest.json").exists():
        model, manifest = load_checkpoint(directory)
        return model, manifest, True
    spec = resolve_arch(
        cfg.arch, in_channels=len(sc.bands), num_classes=len(sc.classes), base_channels=cfg.base_channels
    )
    tcfg = TrainConfig(steps=cfg.train_steps, seed=cfg.seed, device=device, batch_size=8 if cfg.arch == "small" else 4)
    images = [s.image for s in sc.train]
    masks = [s.mask for s in sc.train if s.mask is not None]
    model, manifest = train_source_checkpoint(
        images,
        masks,
        spec.config,
        tcfg,
        classes=sc.classes,
        bands=sc.bands,
        regions=sc.source_regions,
        tile_ids=[tile_key(s) for s in sc.train],
        progress=progress,
        normalisation=spec.normalisation,
    )
    ev = evaluate(model, [s.image for s in sc.calibration], [s.mask for s in sc.calibration if s.mask is not None])
    manifest.metrics["miou_source_heldout"] = ev.miou
    manifest = save_checkpoint(directory, model, manifest)
    return model, manifest, False
