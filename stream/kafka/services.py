"""Builds the dependencies of the Kafka runners from settings (one place, injected everywhere)."""

from __future__ import annotations

from dataclasses import dataclass

from serving.minio_store import HrefReader, MinioStore, minio_client
from serving.predictor import InProcessPredictor, Predictor
from serving.registry import ModelRegistry
from serving.rollout import Deployer, InProcessDeployer
from stream.config import Settings
from stream.kafka.topics import Topics
from stream.pipeline import Pipeline
from terradapt.raster import RasterSpec


@dataclass
class Services:
    """What a worker needs: pipeline (with registry, predictor, deployer), object reader, topic names."""

    settings: Settings
    pipeline: Pipeline
    reader: HrefReader
    topics: Topics


def build_services(settings: Settings) -> Services:
    """Wire MinIO stores, the registry, the configured predictor and deployer into one pipeline."""
    client = minio_client(settings.s3)
    registry = ModelRegistry(MinioStore(client, settings.s3.bucket_models))
    predictions = MinioStore(client, settings.s3.bucket_predictions)
    rt = settings.runtime
    predictor: Predictor
    deployer: Deployer
    if rt.predictor == "torchserve":
        from serving.torchserve import TorchServeClient, TorchServeDeployer, TorchServePredictor

        ts = TorchServeClient(settings.torchserve)
        predictor = TorchServePredictor(ts, registry)
        deployer = TorchServeDeployer(ts, registry)
    else:
        predictor = InProcessPredictor(
            registry, device=rt.device, window=rt.window, overlap=rt.overlap, batch_size=rt.batch_size
        )
        deployer = InProcessDeployer(registry)
    sc = settings.stream
    spec = RasterSpec(
        band_count=sc.band_count,
        expected_crs=sc.expected_crs,
        require_crs=sc.expected_crs is not None,
        max_bytes=sc.max_tile_bytes,
        max_pixels=sc.max_tile_pixels,
    )
    pipeline = Pipeline(
        registry=registry,
        predictor=predictor,
        deployer=deployer,
        adaptation=settings.adaptation,
        monitor_config=settings.monitor,
        spec=spec,
        regions=frozenset(sc.regions) if sc.regions else None,
        predictions=predictions,
    )
    return Services(settings, pipeline, HrefReader(client), Topics.with_prefix(settings.kafka.topic_prefix))
