"""Builds the dependencies of the Kafka runners from settings (one place, injected everywhere)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from adapters.buffer import BufferedTile
from monitoring.metrics import MetricsServer, ServiceMetrics
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
    metrics: ServiceMetrics
    #: the tiles of the job being rolled out, per region (the TorchServe deployer shadow-tests on them)
    rollout_tiles: dict[str, list[BufferedTile]]

    def serve_metrics(self) -> MetricsServer | None:
        """Serve /metrics on the configured loopback port (0 = not served)."""
        cfg = self.settings.metrics
        return self.metrics.serve(cfg.port, cfg.addr) if cfg.port else None


def build_services(settings: Settings) -> Services:
    """Wire MinIO stores, the registry, the configured predictor and deployer into one pipeline."""
    client = minio_client(settings.s3)
    registry = ModelRegistry(MinioStore(client, settings.s3.bucket_models))
    predictions = MinioStore(client, settings.s3.bucket_predictions)
    rt = settings.runtime
    predictor: Predictor
    deployer: Deployer
    rollout_tiles: dict[str, list[BufferedTile]] = {}
    if rt.predictor == "torchserve":
        from serving.torchserve import TorchServeClient, TorchServeDeployer, TorchServePredictor

        if settings.torchserve.model_store is None:
            raise ValueError("predictor='torchserve' needs TERRADAPT_TORCHSERVE__MODEL_STORE (the model store folder)")
        ts = TorchServeClient(settings.torchserve)
        ts_deployer = TorchServeDeployer(
            ts, registry, settings.torchserve.model_store, lambda region: rollout_tiles.get(region, [])
        )
        predictor = TorchServePredictor(ts, on_missing=ts_deployer.sync)
        deployer = ts_deployer
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
    metrics = ServiceMetrics(CollectorRegistry(), regions=sc.regions or None)
    pipeline = Pipeline(
        registry=registry,
        predictor=predictor,
        deployer=deployer,
        adaptation=settings.adaptation,
        monitor_config=settings.monitor,
        spec=spec,
        regions=frozenset(sc.regions) if sc.regions else None,
        predictions=predictions,
        metrics=metrics,
    )
    topics = Topics.with_prefix(settings.kafka.topic_prefix)
    return Services(settings, pipeline, HrefReader(client), topics, metrics, rollout_tiles)
