"""Builds what a Kafka worker needs from settings: MinIO stores, the registry, the pipeline, topic names, metrics.

``build_services`` wires the segmentation pipeline, ``build_crop_services`` the crop loop's calls (crop registry,
its calibration vectors, the same object reader rules and buckets).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from monitoring.metrics import MetricsServer, ServiceMetrics
from serving.crop_registry import CropRegistry
from serving.hrefs import HrefPolicy, HrefReader
from serving.minio_store import MinioStore, minio_client
from serving.registry import ModelRegistry
from serving.retrying import RetryingReader, RetryingStore, RetryPolicy
from stream.build import build_pipeline, configure_threads
from stream.config import Settings
from stream.crops.steps import CropSteps
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
        return serve_metrics(self.settings, self.metrics)


@dataclass
class CropServices:
    """What a crop worker needs: its settings, the crop loop's calls, topics, metrics."""

    settings: Settings
    steps: CropSteps
    topics: Topics
    metrics: ServiceMetrics

    def serve_metrics(self) -> MetricsServer | None:
        """Serve /metrics on the configured loopback port (0 = not served)."""
        return serve_metrics(self.settings, self.metrics)


def serve_metrics(settings: Settings, metrics: ServiceMetrics) -> MetricsServer | None:
    """Serve ``metrics`` on ``metrics.port`` / ``metrics.addr`` (port 0 = not served)."""
    cfg = settings.metrics
    return metrics.serve(cfg.port, cfg.addr) if cfg.port else None


def href_policy(settings: Settings) -> HrefPolicy:
    """Where acquisitions may be read from (``stream.allowed_buckets``, ``stream.file_root``, ``max_tile_bytes``)."""
    sc = settings.stream
    buckets = sc.allowed_buckets if sc.allowed_buckets is not None else (settings.s3.bucket_acquisitions,)
    return HrefPolicy(buckets=frozenset(buckets), file_root=sc.file_root, max_bytes=sc.max_tile_bytes)


def storage_retry(settings: Settings) -> RetryPolicy:
    """How storage calls ride out an outage (``stream.storage_retry_s``)."""
    return RetryPolicy(deadline_s=settings.stream.storage_retry_s)


def build_services(settings: Settings) -> Services:
    """Wire MinIO stores, the registry and the configured predictor and deployer into one pipeline."""
    client = minio_client(settings.s3)
    retry = storage_retry(settings)
    registry = ModelRegistry(RetryingStore(MinioStore(client, settings.s3.bucket_models), retry))
    metrics = ServiceMetrics(CollectorRegistry(), regions=settings.stream.regions or None)
    pipeline = build_pipeline(
        settings,
        registry=registry,
        reader=RetryingReader(HrefReader(client, href_policy(settings)), retry),
        predictions=RetryingStore(MinioStore(client, settings.s3.bucket_predictions), retry),
        observer=MetricsObserver(metrics),
    )
    return Services(settings, pipeline, Topics.with_prefix(settings.kafka.topic_prefix), metrics)


def build_crop_services(settings: Settings) -> CropServices:
    """Wire the crop registry (models bucket, ``crops/`` prefix), its calibration, the object reader and metrics.

    Raises:
        CalibrationError: the registry holds no crop calibration (run ``terradapt crops init``) or a stale one.

    """
    configure_threads(settings)
    client = minio_client(settings.s3)
    retry = storage_retry(settings)
    registry = CropRegistry(RetryingStore(MinioStore(client, settings.s3.bucket_models), retry))
    metrics = ServiceMetrics(CollectorRegistry(), regions=settings.stream.regions or None)
    steps = CropSteps.from_settings(
        settings,
        registry,
        RetryingReader(HrefReader(client, href_policy(settings)), retry),
        RetryingStore(MinioStore(client, settings.s3.bucket_predictions), retry),
        metrics,
    )
    return CropServices(settings, steps, steps.topics, metrics)
