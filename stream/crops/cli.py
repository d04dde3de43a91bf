"""``terradapt demo --task crops`` (the crop demo, its per-country table) and ``terradapt crops ...`` (the Kafka path).

``terradapt crops init`` puts a source crop model and its drift calibration in the registry, ``crops ingest``
publishes parcel series, ``crops label`` a delayed label, ``crops worker`` / ``crops adapt-worker`` run the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stream.cli_common import ConfigOption, _console, _settings
from stream.crops.config import QUICK_CROP_DEMO, CropLoopConfig

__all__ = ["crop_demo", "crops_app"]


def crop_demo(config: CropLoopConfig, *, quick: bool = False, metrics_port: int = 0) -> None:
    """Run the crop demo on ``config`` (``quick``: the tiny scenario) and print the results.

    Args:
        config: The ``[crops]`` settings (the scenario is ``config.demo``).
        quick: Use ``QUICK_CROP_DEMO`` over the configured scenario (tests, smoke runs).
        metrics_port: Serve Prometheus ``/metrics`` on this loopback port (0 = off).

    """
    from stream.crops.demo import run_crop_demo

    if quick:
        demo = config.demo.model_validate({**config.demo.model_dump(), **QUICK_CROP_DEMO})
        config = config.model_copy(update={"demo": demo})
    metrics = None
    if metrics_port:
        from prometheus_client import CollectorRegistry

        from monitoring.metrics import ServiceMetrics

        metrics = ServiceMetrics(CollectorRegistry())
        metrics.serve(metrics_port)
    console = _console()
    result = run_crop_demo(config, metrics=metrics, on_stage=console.log)
    table = Table(title="terradapt demo --task crops: per-country results (scored on labelled held-out parcels)")
    for col in (
        "country",
        "shift",
        "parcels",
        "drift at",
        "signals",
        "published",
        "serves",
        "offset",
        "gate",
        "OA source",
        "OA system",
        "F1 source",
        "F1 system",
    ):
        table.add_column(col)
    for r in result.rows:
        table.add_row(
            r.region,
            r.shift,
            str(r.parcels),
            str(r.drift_at) if r.drift_at else "no",
            r.signal,
            ", ".join(f"v{v}" for v in r.versions) or "-",
            f"v{r.final_version}",
            f"{r.date_offset:+.0f} d",
            r.gate,
            f"{100 * r.oa_source:.1f}",
            f"{100 * r.oa_system:.1f}",
            f"{100 * r.f1_source:.1f}",
            f"{100 * r.f1_system:.1f}",
        )
    console.print(table)
    reasons = sorted({d.reason for d in result.run.dead_letters})
    console.print(
        f"dead letters: {len(result.run.dead_letters)} ({', '.join(reasons) or '-'}); "
        f"source trained in {result.train_s:.1f} s; run {result.seconds:.0f} s; report: {result.report}"
    )


crops_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Crop mapping on Kafka: put a source crop model in the registry, ingest parcel series, run the workers.",
)


@crops_app.command("init")
def init(
    model: Annotated[Path, typer.Option(help="crop checkpoint folder (weights.safetensors + manifest.json)")],
    calibration: Annotated[
        Path,
        typer.Option(help="held-out source parcels: a BreizhCrops-layout folder, or a folder of .npz series files"),
    ],
    config: ConfigOption = None,
) -> None:
    """Publish the source crop model as version 0 and calibrate the drift monitor on held-out source parcels."""
    from serving.crop_registry import CropRegistry
    from serving.minio_store import MinioStore, minio_client
    from stream.config import Settings
    from stream.crops.bootstrap import init_crop_registry, read_series_files
    from terradapt.checkpoint import WEIGHTS_FILE
    from terradapt.crops.breizhcrops import BreizhCropsDataset
    from terradapt.crops.checkpoint import load_crop

    settings = _settings(config)
    assert isinstance(settings, Settings)
    _, manifest = load_crop(model)  # verified (sha256, architecture) before anything is published
    if (calibration / "classmapping.csv").exists():
        ds = BreizhCropsDataset(calibration)
        parcels = [ds.load(r, p) for r in ds.regions() for p in ds.parcel_ids(r)]
    else:
        parcels = read_series_files(sorted(calibration.glob("*.npz")), "source")
    registry = CropRegistry(MinioStore(minio_client(settings.s3), settings.s3.bucket_models))
    n = init_crop_registry(registry, (model / WEIGHTS_FILE).read_bytes(), manifest, parcels, settings.crops)
    _console().print(f"crop source model published as version 0; drift monitor calibrated on {n} parcels")


@crops_app.command("ingest")
def ingest(
    paths: Annotated[list[Path], typer.Argument(help=".npz parcel series files (parcel id = file name stem)")],
    region: Annotated[str, typer.Option(help="region code, e.g. lv-1")],
    country: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2 code of the parcels' country, e.g. LV")],
    config: ConfigOption = None,
) -> None:
    """Upload parcel series to the acquisitions bucket and publish their STAC items on the crop-series topic."""
    from serving.minio_store import MinioStore, minio_client
    from stream.config import Settings
    from stream.crops.bootstrap import publish_series, read_series_files
    from stream.kafka.ingest import make_producer
    from stream.topics import Topics

    settings = _settings(config)
    assert isinstance(settings, Settings)
    series = read_series_files(paths, region)
    store = MinioStore(minio_client(settings.s3), settings.s3.bucket_acquisitions)
    producer = make_producer(settings.kafka)
    topic = Topics.with_prefix(settings.kafka.topic_prefix).crop_series
    try:
        report = publish_series(series, country=country, store=store, producer=producer, topic=topic)
    finally:
        producer.close()
    for parcel, reason in report.refused:
        _console().print(f"refused {parcel}: {reason}")
    _console().print(f"{len(report.published)} series published to {topic}")
    if report.refused:
        raise typer.Exit(1)


@crops_app.command("label")
def label(
    acquisition_id: Annotated[str, typer.Option(help="the series item the label belongs to (<region>_<parcel>)")],
    region: Annotated[str, typer.Option(help="region code of the parcel")],
    crop: Annotated[int, typer.Option(help="the parcel's crop class index (the model's classes)")],
    config: ConfigOption = None,
) -> None:
    """Publish a parcel's delayed crop label on the crop-labels topic."""
    from stream.config import Settings
    from stream.kafka.ingest import make_producer
    from stream.topics import Topics
    from terradapt.crops.stream_records import ParcelLabel

    settings = _settings(config)
    assert isinstance(settings, Settings)
    record = ParcelLabel(acquisition_id=acquisition_id, region=region, label=crop)
    producer = make_producer(settings.kafka)
    topic = Topics.with_prefix(settings.kafka.topic_prefix).crop_labels
    try:
        producer.send(topic, key=region.encode(), value=record.to_json()).get(timeout=30)
    finally:
        producer.close()
    _console().print(f"label of {acquisition_id} published to {topic}")


@crops_app.command("worker")
def worker(config: ConfigOption = None) -> None:
    """Run the faust crop worker (predict parcels, monitor, trigger; delayed labels)."""
    import faust

    from stream.config import Settings
    from stream.kafka.services import build_crop_services
    from stream.kafka.topics import ensure_topics
    from stream.kafka.worker import create_crop_app

    settings = _settings(config)
    assert isinstance(settings, Settings)
    services = build_crop_services(settings)
    ensure_topics(settings.kafka, services.topics)
    services.serve_metrics()
    faust.Worker(create_crop_app(services), loglevel="INFO").execute_from_commandline()


@crops_app.command("adapt-worker")
def adapt_worker(config: ConfigOption = None) -> None:
    """Run the crop adaptation worker (its own process and consumer group)."""
    import logging

    from stream.config import Settings
    from stream.kafka.adapt_worker import crop_adapt_worker, run_forever
    from stream.kafka.services import build_crop_services
    from stream.kafka.topics import ensure_topics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(config)
    assert isinstance(settings, Settings)
    services = build_crop_services(settings)
    ensure_topics(settings.kafka, services.topics)
    services.serve_metrics()
    run_forever(crop_adapt_worker(services))
