"""The demo: the whole terradapt loop on embedded defaults (no services).

Synthetic FLAIR-format departements (or the real Dubai areas) stream in; the source model is trained (or loaded
from the cache); every region is monitored with source-calibrated tests; a region with covariate drift is
adapted, gated and rolled out for that region only; per-region mIoU of the source model and of the region's final
model is measured on held-out labelled tiles of that region.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from adapters.job import AdaptationConfig
from adapters.trigger import TriggerConfig
from monitoring.dashboard import dashboard_state, write_state
from monitoring.metrics import ServiceMetrics
from monitoring.monitor import MonitorConfig
from serving.predictor import InProcessPredictor
from serving.registry import ModelRegistry
from serving.rollout import InProcessDeployer
from serving.store import FileSystemStore
from stream.embedded import EmbeddedRunner, RunResult, StreamItem, TileLog
from stream.pipeline import CALIBRATION_KEY, Pipeline, calibrate_monitor
from stream.report import RegionRow, write_report
from terradapt.checkpoint import ModelManifest, encode, load_checkpoint, save_checkpoint
from terradapt.datasets.base import Sample, iter_patches
from terradapt.datasets.dubai import DubaiDataset
from terradapt.datasets.synthetic import DEPARTEMENTS, SyntheticDataset, shift_image
from terradapt.model import UNet, UNetConfig
from terradapt.raster import Raster, RasterSpec, raster_to_geotiff_bytes
from terradapt.records import Acquisition
from terradapt.settings import StrictModel
from terradapt.training import TrainConfig, evaluate, train_source_checkpoint


class DemoConfig(StrictModel):
    """Everything the demo does, with defaults that finish in minutes on 2 CPU cores."""

    dataset: Literal["synthetic", "dubai"] = "synthetic"
    workdir: Path = Path(".terradapt/demo")
    cache_dir: Path = Path(".terradapt/cache")
    report_dir: Path = Path("report")
    tile_size: int = Field(default=256, ge=64)
    train_tiles: int = Field(default=32, ge=4, description="source tiles per source region")
    calibration_tiles: int = Field(default=40, ge=8)
    stream_tiles: int = Field(default=40, ge=8, description="streamed tiles per region")
    eval_tiles: int = Field(default=12, ge=1, description="held-out labelled tiles per region")
    train_steps: int = Field(default=300, ge=1)
    base_channels: int = Field(default=16, ge=4)
    seed: int = 0
    device: str = "auto"
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)


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


def _acquisitions(streams: dict[str, list[Sample]], bands: tuple[str, ...]) -> Iterator[StreamItem]:
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
            "calib": cfg.calibration_tiles,
            "v": 1,
            "tiles": [s.tile_id for s in sc.train],
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def source_model(
    cfg: DemoConfig, sc: Scenario, progress: Callable[[int, float], None] | None = None
) -> tuple[UNet, ModelManifest, bool]:
    """Load the cached source model for this configuration, or train and cache it. Returns (model, manifest, cached)."""
    directory = cfg.cache_dir / f"source-{_cache_key(cfg, sc)}"
    if (directory / "manifest.json").exists():
        model, manifest = load_checkpoint(directory)
        return model, manifest, True
    mcfg = UNetConfig(in_channels=len(sc.bands), num_classes=len(sc.classes), base_channels=cfg.base_channels)
    tcfg = TrainConfig(steps=cfg.train_steps, seed=cfg.seed, device=cfg.device)
    images = [s.image for s in sc.train]
    masks = [s.mask for s in sc.train if s.mask is not None]
    model, manifest = train_source_checkpoint(
        images,
        masks,
        mcfg,
        tcfg,
        classes=sc.classes,
        bands=sc.bands,
        regions=sc.source_regions,
        progress=progress,
    )
    ev = evaluate(model, [s.image for s in sc.calibration], [s.mask for s in sc.calibration if s.mask is not None])
    manifest.metrics["miou_source_heldout"] = ev.miou
    manifest = save_checkpoint(directory, model, manifest)
    return model, manifest, False


@dataclass
class DemoResult:
    """What the demo returns (also written to the report)."""

    rows: list[RegionRow]
    run: RunResult
    report: Path
    cached_model: bool


def run_demo(
    cfg: DemoConfig,
    *,
    on_train: Callable[[int, float], None] | None = None,
    on_tile: Callable[[TileLog], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    metrics: ServiceMetrics | None = None,
) -> DemoResult:
    """Run the whole loop and write the report."""
    stage = on_stage or (lambda _: None)
    stage("generating data")
    sc = synthetic_scenario(cfg) if cfg.dataset == "synthetic" else dubai_scenario(cfg)
    stage("source model")
    model, manifest, cached = source_model(cfg, sc, on_train)
    rows, result, registry = run_stream(cfg, sc, model, manifest, on_tile=on_tile, on_stage=stage, metrics=metrics)
    title = f"terradapt demo - {sc.name}"
    report = write_report(cfg.report_dir, result, rows, title)
    write_state(dashboard_state(result, registry, rows=rows, title=title), cfg.report_dir / "state.json")
    return DemoResult(rows, result, report, cached)


def build_pipeline(
    cfg: DemoConfig,
    sc: Scenario,
    model: UNet,
    manifest: ModelManifest,
    *,
    regions: frozenset[str] | None = None,
    metrics: ServiceMetrics | None = None,
) -> Pipeline:
    """A fresh file-system registry under ``cfg.workdir`` with the source model, calibrated on ``sc.calibration``.

    With labelled calibration tiles the calibration also holds the source confusion matrix (label-shift estimates).
    """
    if cfg.workdir.exists():
        shutil.rmtree(cfg.workdir)
    store = FileSystemStore(cfg.workdir / "registry")
    registry = ModelRegistry(store)
    weights, manifest_json = encode(model, manifest)
    registry.publish_source(weights, ModelManifest.model_validate_json(manifest_json))
    predictor = InProcessPredictor(registry, device=cfg.device, window=max(cfg.tile_size, 256))
    calib_masks = [s.mask for s in sc.calibration if s.mask is not None]
    calibration = calibrate_monitor(
        predictor,
        [s.image for s in sc.calibration],
        cfg.monitor,
        cfg.seed,
        calib_masks if len(calib_masks) == len(sc.calibration) else None,
    )
    store.put(CALIBRATION_KEY, json.dumps(calibration).encode(), "application/json")
    return Pipeline(
        registry=registry,
        predictor=predictor,
        deployer=InProcessDeployer(registry),
        adaptation=cfg.adaptation,
        monitor_config=cfg.monitor,
        spec=sc.spec,
        regions=regions,
        predictions=FileSystemStore(cfg.workdir / "predictions"),
        metrics=metrics,
    )


def run_stream(
    cfg: DemoConfig,
    sc: Scenario,
    model: UNet,
    manifest: ModelManifest,
    *,
    on_tile: Callable[[TileLog], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    metrics: ServiceMetrics | None = None,
) -> tuple[list[RegionRow], RunResult, ModelRegistry]:
    """The system's loop on a scenario: fresh registry under ``cfg.workdir``, calibration, stream, evaluation.

    What ``bench/adaptation.py`` measures as the terradapt policy (monitor + trigger + method + gate).
    """
    stage = on_stage or (lambda _: None)
    stage("calibrating drift tests on held-out source tiles")
    pipeline = build_pipeline(cfg, sc, model, manifest, regions=frozenset(sc.streams), metrics=metrics)
    registry = pipeline.registry
    runner = EmbeddedRunner(pipeline, trigger=cfg.trigger, on_tile=on_tile)
    stage("streaming acquisitions")
    result = runner.run(_acquisitions(sc.streams, sc.bands))
    stage("evaluating on held-out labelled tiles")
    rows = []
    for region, held in sc.held_out.items():
        images = [s.image for s in held]
        masks = [s.mask for s in held if s.mask is not None]
        current = registry.current(region)
        src_eval = evaluate(registry.load(region, 0)[0], images, masks)
        cur_eval = src_eval if current == 0 else evaluate(registry.load(region, current)[0], images, masks)
        det = result.first_detection.get(region)
        fired = next((",".join(e.fired) for e in result.drift_events if e.region == region), "-")
        gates = [a for a in result.adaptations if a.version.region == region]
        gate = (
            "-" if not gates else ("accepted" if gates[-1].gate.accepted else "rejected: " + gates[-1].gate.reasons[0])
        )
        rows.append(
            RegionRow(
                region,
                sc.shift[region],
                len(sc.streams[region]),
                det,
                fired,
                current,
                gate,
                src_eval.miou,
                cur_eval.miou,
            )
        )
    return rows, result, registry
