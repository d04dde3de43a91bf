"""Builds what a Kafka worker needs from settings: MinIO stores, the registry, the pipeline, topic names, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from monitoring.metrics import MetricsServer, ServiceMetrics
from serving.minio_store import HrefReader, MinioStore, minio_client
from serving.registry import ModelRegistry
from stream.build import build_pipeline
from stream.config import Settings
from stream.observer import MetricsObserver
from stream.pipeline import Pipeline
from stream.topics import Topics


@dataclass
class Services:
    """What a worker needs: its settings, the pipeline (registry, predictor, deployer inside), topics, metrics."""

    settings: Settings
    pipeline: Pipeline
    topics: Topics
    metrics: ServiceMetrics

    def serve_metrics(self) -> MetricsServer | None:
        """Serve /metrics on the configured loopback port (0 = not served)."""
        cfg = self.settings.metrics
        return self.metrics.serve(cfg.port, cfg.addr) if cfg.port else None


def build_services(settings: Settings) -> Services:
    """Wire MinIO stores, the registry and the configured predictor and deployer into one pipeline."""
    client = minio_client(settings.s3)
    registry = ModelRegistry(MinioStore(client, settings.s3.bucket_models))
    metrics = ServiceMetrics(CollectorRegistry(), regions=settings.stream.regions or None)
    pipeline = build_pipeline(
        settings,
        registry=registry,
        reader=HrefReader(client),
        predictions=MinioStore(client, settings.s3.bucket_predictions),
        observer=MetricsObserver(metrics),
    )
    return Services(settings, pipeline, Topics.with_prefix(settings.kafka.topic_prefix), metrics)
