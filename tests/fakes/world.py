"""A tiny trained world for pipeline tests: a 64 px U-Net trained on synthetic D033, bootstrapped registries.

Training takes about 10 s on one core; every test then gets its own fresh registry (publish + calibrate, ~1 s)
and builds its pipeline from ``Settings``, as the runners do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from affine import Affine

from monitoring.metrics import ServiceMetrics
from serving.registry import ModelRegistry
from serving.store import FileSystemStore, MemoryReader, MemoryStore
from stream.bootstrap import bootstrap_registry
from stream.build import build_pipeline
from stream.config import Settings
from stream.observer import PipelineObserver
from stream.pipeline import Pipeline
from terradapt.checkpoint import ModelManifest, encode
from terradapt.datasets.base import Sample
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.model import SegmentationModel, UNetConfig
from terradapt.raster import Raster, raster_to_geotiff_bytes
from terradapt.records import Acquisition, AdaptationJob, DriftEvent
from terradapt.training import TrainConfig, train_source_checkpoint

SIZE = 64


@dataclass
class World:
    """The trained source model, its calibration tiles and tiles to stream."""

    model: SegmentationModel
    manifest: ModelManifest
    calibration: list[Sample]
    source: list[Sample]
    shifted: list[Sample]
    label_shift: list[Sample]


def make_world() -> World:
    """Train the tiny source model (seeded) and cut the tiles."""
    torch.manual_seed(0)
    ds = SyntheticDataset({"D033": 120, "D013": 40, "D029": 24}, size=SIZE, seed=0)
    src = [ds.load("D033", i) for i in ds.tile_ids("D033")]
    order = np.random.default_rng(0).permutation(len(src))
    src = [src[i] for i in order]
    model, manifest = train_source_checkpoint(
        [s.image for s in src[:24]],
        [s.mask for s in src[:24] if s.mask is not None],
        UNetConfig(in_channels=5, num_classes=13, base_channels=8, depth=2),
        TrainConfig(steps=100, batch_size=8, crop=SIZE, lr=1e-2, seed=0, device="cpu"),
        classes=ds.classes,
        bands=ds.band_names,
        regions=("D033",),
        tile_ids=[f"D033/{s.tile_id}" for s in src[:24]],
    )
    return World(
        model,
        manifest,
        calibration=src[24:88],
        source=src[88:],
        shifted=[ds.load("D013", i) for i in ds.tile_ids("D013")],
        label_shift=[ds.load("D029", i) for i in ds.tile_ids("D029")],
    )


def fresh_registry(world: World, root: Path) -> ModelRegistry:
    """A file-system registry with the source model and its calibration (labelled: BBSE has a confusion)."""
    registry = ModelRegistry(FileSystemStore(root))
    weights, manifest_json = encode(world.model, world.manifest)
    bootstrap_registry(
        registry,
        weights,
        ModelManifest.model_validate_json(manifest_json),
        [s.image for s in world.calibration],
        tile_ids=[f"D033/{s.tile_id}" for s in world.calibration],
        masks=[s.mask for s in world.calibration if s.mask is not None],
        device="cpu",
    )
    return registry


def settings(**sections: Mapping[str, object]) -> Settings:
    """Test settings: CPU, small windows of the tiny tiles; ``sections`` override whole sections' fields."""
    base: dict[str, dict[str, object]] = {"runtime": {"device": "cpu"}, "adaptation": {"device": "cpu"}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return Settings.model_validate(base)


@dataclass
class Rig:
    """A pipeline over a fresh registry, the object store its acquisitions live in, and its prediction store."""

    pipeline: Pipeline
    registry: ModelRegistry
    objects: MemoryStore
    predictions: MemoryStore
    metrics: ServiceMetrics | None = None


def make_rig(
    world: World,
    root: Path,
    config: Settings,
    observer: PipelineObserver | None = None,
    **overrides: object,
) -> Rig:
    """A pipeline built from ``config`` (as every runner builds it) over a fresh registry under ``root``."""
    registry = fresh_registry(world, root)
    objects = MemoryStore("acquisitions")
    predictions = MemoryStore("predictions")
    pipeline = build_pipeline(
        config,
        registry=registry,
        reader=MemoryReader(objects),
        predictions=predictions,
        observer=observer,
        **overrides,  # type: ignore[arg-type]
    )
    return Rig(pipeline, registry, objects, predictions)


def publish(objects: MemoryStore, region: str, index: int, image: np.ndarray) -> bytes:
    """Store one tile as a GeoTIFF and return its STAC payload (what `terradapt ingest` announces)."""
    transform = Affine(0.2, 0.0, 400_000.0 + 20.0 * index, 0.0, -0.2, 6_400_000.0)
    data = raster_to_geotiff_bytes(Raster(image, "EPSG:2154", transform))
    acq_id = f"{region}-{index:05d}"
    href = objects.put(f"{region}/{acq_id}.tif", data, "image/tiff")
    acq = Acquisition(
        id=acq_id,
        region=region,
        datetime=datetime(2024, 6, 1, tzinfo=UTC) + timedelta(minutes=index),
        bbox=(0.0, 0.0, 1.0, 1.0),
        crs="EPSG:2154",
        href=href,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return acq.to_json()


def published_job(
    objects: MemoryStore,
    region: str,
    images: list[np.ndarray],
    *,
    job_id: str = "adapt-1",
    base_version: int = 0,
    covariate: bool = True,
) -> AdaptationJob:
    """Store ``images`` as the region's tiles 0..n-1 and return the ``bn`` job a radiometry drift on them issues."""
    hrefs = []
    for i, image in enumerate(images):
        publish(objects, region, i, image)
        hrefs.append(f"memory://acquisitions/{region}/{region}-{i:05d}.tif")
    n = len(images)
    drift = DriftEvent(
        region=region,
        acquisition_id=f"{region}-{n - 1:05d}",
        tiles_seen=n,
        signal="radiometry",
        score=9.0,
        threshold=1.0,
        fired=("radiometry",),
        covariate=covariate,
    )
    return AdaptationJob(
        job_id=job_id,
        region=region,
        base_version=base_version,
        method="bn",
        tile_ids=tuple(f"{region}-{i:05d}" for i in range(n)),
        tile_hrefs=tuple(hrefs),
        trigger=drift,
    )
