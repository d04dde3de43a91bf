"""The ``terradapt`` command line (typer). Every command builds its dependencies from typed settings."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from stream.cli_common import ConfigOption, _console, _settings, capture_times
from stream.cli_models import adapt, evaluate, generate, import_model, registry_init, train
from stream.crops.cli import crops_app

app = typer.Typer(add_completion=False, help="terradapt: keep land-cover models accurate as they meet new regions.")
app.add_typer(crops_app, name="crops")


@app.command()
def demo(
    dataset: Annotated[
        str | None, typer.Option(help="synthetic (FLAIR-format departements) or dubai (real areas); default: settings")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file ([demo] and every other section)")] = None,
    quick: Annotated[bool, typer.Option(help="tiny configuration (tests, smoke runs)")] = False,
    arch: Annotated[
        str | None,
        typer.Option(help="source architecture: small, flair-baseline, smp:<Arch>:<encoder>; default: settings"),
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="serve Prometheus /metrics on this loopback port (0 = off)")] = 0,
    task: Annotated[
        str, typer.Option(help="segmentation (land cover tiles) or crops (parcel time series, [crops] settings)")
    ] = "segmentation",
) -> None:
    """Run the whole loop on embedded defaults: stream, detect drift, adapt, gate, deploy, report.

    Every setting applies (``TERRADAPT_MONITOR__ERT``, ``TERRADAPT_ADAPTATION__METHOD``...); ``[demo]`` /
    ``TERRADAPT_DEMO__*`` choose the scenario. ``--task crops`` runs the crop loop on synthetic countries
    (``[crops]`` / ``TERRADAPT_CROPS__*``, its scenario in ``[crops.demo]``).
    """
    import torch

    from stream.config import QUICK_DEMO, Settings
    from stream.demo import run_demo

    if task not in ("segmentation", "crops"):
        raise typer.BadParameter(f"--task {task!r}; accepted: segmentation, crops")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = _settings(config)
    assert isinstance(settings, Settings)
    if task == "crops":
        from stream.crops.cli import crop_demo

        if dataset or arch:
            raise typer.BadParameter("--dataset and --arch choose the segmentation demo; --task crops has its own")

        crop_demo(settings.crops, quick=quick, metrics_port=metrics_port)
        return
    update = dict(QUICK_DEMO) if quick else {}
    if dataset:
        update["dataset"] = dataset
    if arch:
        update["arch"] = arch
    settings = settings.model_copy(
        update={"demo": settings.demo.model_validate({**settings.demo.model_dump(), **update})}
    )
    cfg = settings.demo
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=_console(),
    ) as progress:
        train_task = progress.add_task("training source model", total=cfg.train_steps, info="", visible=False)
        stream_task = progress.add_task("streaming", total=None, info="", visible=False)

        def on_train(step: int, loss: float) -> None:
            progress.update(train_task, completed=step, info=f"loss {loss:.3f}", visible=True)

        def on_tile(log: object) -> None:
            from stream.embedded import TileLog

            if isinstance(log, TileLog):
                flag = f" drift:{','.join(log.fired)}" if log.fired else ""
                progress.update(
                    stream_task,
                    advance=1,
                    visible=True,
                    info=f"{log.region} tile {log.index} model v{log.version}{flag}",
                )

        def on_stage(name: str) -> None:
            progress.console.log(name)

        observer = None
        if metrics_port:
            from prometheus_client import CollectorRegistry

            from monitoring.metrics import ServiceMetrics
            from stream.observer import MetricsObserver

            metrics = ServiceMetrics(CollectorRegistry())
            metrics.serve(metrics_port)
            observer = MetricsObserver(metrics)
        result = run_demo(settings, on_train=on_train, on_tile=on_tile, on_stage=on_stage, observer=observer)
    table = Table(title="terradapt demo: per-region results")
    for col in (
        "region",
        "shift",
        "tiles",
        "drift at tile",
        "signal",
        "model",
        "gate",
        "mIoU source",
        "mIoU region",
    ):
        table.add_column(col)
    for r in result.rows:
        table.add_row(
            r.region,
            r.shift,
            str(r.tiles),
            str(r.drift_at) if r.drift_at else "no",
            r.signal,
            f"v{r.version}",
            r.gate,
            f"{100 * (r.miou_source or 0):.1f}",
            f"{100 * (r.miou_current or 0):.1f}",
        )
    _console().print(table)
    _console().print("dashboard: terradapt dashboard --state " + str(cfg.report_dir / "state.json"))
    _console().print(
        f"source model {'loaded from cache' if result.cached_model else 'trained'}; "
        f"dead letters: {len(result.run.dead_letters)}; report: {result.report}"
    )


@app.command()
def topics(config: ConfigOption = None) -> None:
    """Create the Kafka topics (idempotent) with the configured partition count."""
    from stream.config import Settings
    from stream.kafka.topics import ensure_topics
    from stream.topics import Topics

    settings = _settings(config)
    assert isinstance(settings, Settings)
    created = ensure_topics(settings.kafka, Topics.with_prefix(settings.kafka.topic_prefix))
    _console().print(f"created {len(created)} topics: {', '.join(created) or '-'}")


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="GeoTIFF files to ingest")],
    region: Annotated[str, typer.Option(help="region code, e.g. D033")],
    config: ConfigOption = None,
    when: Annotated[
        str | None, typer.Option("--datetime", help="capture time of every file (ISO 8601; no zone = UTC)")
    ] = None,
    datetimes: Annotated[Path | None, typer.Option(help="CSV of id,datetime rows (id = file name or stem)")] = None,
    flair_metadata: Annotated[
        Path | None, typer.Option(help="FLAIR aerial metadata JSON (else one beside the tiles is used)")
    ] = None,
    campaign_start: Annotated[str | None, typer.Option(help="campaign start, for files nothing dates")] = None,
    campaign_end: Annotated[str | None, typer.Option(help="campaign end, for files nothing dates")] = None,
    allow_undated: Annotated[
        bool, typer.Option(help="publish files nothing dates or bounds anyway (datetime null: not valid STAC)")
    ] = False,
) -> None:
    """Upload GeoTIFFs to MinIO and publish their STAC items on the acquisitions topic (key = region).

    The capture time comes from the data: ``--datetime``, a ``--datetimes`` CSV row, FLAIR metadata, or the TIFF
    datetime tag, in that order. A file none of them dates is published with ``datetime: null`` and the campaign's
    interval (``--campaign-start``/``--campaign-end``); without a campaign it is left unpublished (reason
    ``unknown_capture_time``) unless ``--allow-undated``: the time of ingest is never used, and STAC 1.1 requires
    the interval when ``datetime`` is null.

    Outages of Kafka or MinIO are retried with backoff up to ``[ingest] deadline_s`` (``TERRADAPT_INGEST__*``).
    Re-running is safe: objects already stored with the same sha256 are not uploaded again and the same
    acquisition ids are published. Exits 1 only when a file stayed unpublished (each is listed with its reason).
    """
    from serving.minio_store import MinioStore, minio_client
    from serving.retrying import RetryEvent
    from stream.config import Settings
    from stream.kafka.ingest import FileResult, KafkaPublisher
    from stream.kafka.ingest import ingest as run_ingest
    from stream.topics import Topics

    settings = _settings(config)
    assert isinstance(settings, Settings)
    times = capture_times(when, datetimes, flair_metadata, campaign_start, campaign_end, require=not allow_undated)
    console = _console()
    # no call at construction: the bucket is created on the first upload, the producer on the first publish
    store = MinioStore(minio_client(settings.s3), settings.s3.bucket_acquisitions, create=False)
    publisher = KafkaPublisher.from_settings(settings.kafka, settings.ingest)
    topic = Topics.with_prefix(settings.kafka.topic_prefix).acquisitions

    def retrying(event: RetryEvent) -> None:
        console.print(
            f"{event.service} unavailable ({event.what}): {event.error}; "
            f"retry {event.attempt} in {event.delay_s:.1f} s",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    with Progress(console=console) as progress:
        task = progress.add_task(f"ingesting {region}", total=len(paths))

        def advanced(_: FileResult) -> None:
            progress.advance(task)

        try:
            report = run_ingest(
                paths,
                region,
                store,
                publisher,
                topic,
                advanced,
                config=settings.ingest,
                on_retry=retrying,
                times=times,
            )
        finally:
            publisher.close()
    console.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    undated = [
        f.path.name
        for f in report.published
        if f.acquisition and f.acquisition.acquired is None and (times.campaign_start is None or not times.campaign_end)
    ]
    if undated:
        console.print(f"published undated (--allow-undated, no campaign): {len(undated)} files", markup=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def catalog(
    region: Annotated[str, typer.Option(help="region code, e.g. D033")],
    config: ConfigOption = None,
) -> None:
    """Write a static STAC catalog of a region's predictions (with their imagery and model items) to MinIO.

    The catalog lands in the predictions bucket under ``catalog/<region>/catalog.json``, with relative links only:
    serve the bucket to a STAC browser or open it with QGIS' STAC plugin.
    """
    from serving.catalog import write_catalog
    from serving.minio_store import MinioStore, minio_client
    from serving.registry import ModelRegistry
    from stream.config import Settings

    settings = _settings(config)
    assert isinstance(settings, Settings)
    client = minio_client(settings.s3)
    registry = ModelRegistry(MinioStore(client, settings.s3.bucket_models, create=False))
    summary = write_catalog(MinioStore(client, settings.s3.bucket_predictions, create=False), registry, region)
    _console().print(
        f"catalog {summary.href}: {summary.predictions} predictions, {summary.acquisitions} acquisitions, "
        f"{summary.models} model versions"
    )


@app.command()
def label(
    mask: Annotated[Path, typer.Argument(help="single-band GeoTIFF reference mask of one acquisition")],
    acquisition_id: Annotated[str, typer.Option(help="the acquisition the mask belongs to")],
    region: Annotated[str, typer.Option(help="region code of the acquisition")],
    flair19: Annotated[bool, typer.Option(help="mask holds raw FLAIR labels 1..19 (else class indices)")] = False,
    config: ConfigOption = None,
) -> None:
    """Publish a delayed label: upload the mask and announce it on the labels topic."""
    from serving.minio_store import MinioStore, minio_client
    from stream.config import Settings
    from stream.kafka.ingest import make_producer
    from stream.topics import Topics
    from terradapt.records import LabelRecord

    settings = _settings(config)
    assert isinstance(settings, Settings)
    store = MinioStore(minio_client(settings.s3), settings.s3.bucket_acquisitions)
    href = store.put(f"{region}/labels/{acquisition_id}.tif", mask.read_bytes(), "image/tiff")
    record = LabelRecord(
        acquisition_id=acquisition_id, region=region, href=href, encoding="flair19" if flair19 else "classes"
    )
    producer = make_producer(settings.kafka)
    topic = Topics.with_prefix(settings.kafka.topic_prefix).labels
    producer.send(topic, key=region.encode(), value=record.to_json()).get(timeout=30)
    producer.close()
    _console().print(f"label of {acquisition_id} published to {topic}")


@app.command()
def worker(config: ConfigOption = None) -> None:
    """Run the faust stream worker (predict, featurize, monitor, trigger)."""
    import faust

    from stream.config import Settings
    from stream.kafka.services import build_services
    from stream.kafka.topics import ensure_topics
    from stream.kafka.worker import create_app

    settings = _settings(config)
    assert isinstance(settings, Settings)
    services = build_services(settings)
    ensure_topics(settings.kafka, services.topics)
    services.serve_metrics()
    faust_app = create_app(services)
    faust.Worker(faust_app, loglevel="INFO").execute_from_commandline()


@app.command("adapt-worker")
def adapt_worker(config: ConfigOption = None) -> None:
    """Run the adaptation worker (its own process and consumer group)."""
    import logging

    from stream.config import Settings
    from stream.kafka.adapt_worker import AdaptWorker, run_forever
    from stream.kafka.services import build_services
    from stream.kafka.topics import ensure_topics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(config)
    assert isinstance(settings, Settings)
    services = build_services(settings)
    ensure_topics(settings.kafka, services.topics)
    services.serve_metrics()
    run_forever(AdaptWorker(services))


@app.command()
def dashboard(
    state: Annotated[Path, typer.Option(help="state file written by a run (make demo: report/state.json)")] = Path(
        "report/state.json"
    ),
    host: Annotated[str, typer.Option(help="bind address (no authentication: keep loopback)")] = "127.0.0.1",
    port: int = 8765,
) -> None:
    """Serve the built-in dashboard: drift map of departements, drift timelines, versions, rollouts, accuracy."""
    from monitoring.dashboard import run_dashboard

    _console().print(f"dashboard on http://{host}:{port}/ (state: {state}); Ctrl-C to stop")
    run_dashboard(state, host, port)


@app.command()
def info() -> None:
    """Versions, device, registered methods and detectors."""
    import torch

    from adapters.registry import available_adapters
    from monitoring.detectors import available_detectors
    from terradapt import __version__

    _console().print(
        f"terradapt {__version__}; python {sys.version.split()[0]}; torch {torch.__version__}; "
        f"cuda available: {torch.cuda.is_available()}"
    )
    _console().print(f"adaptation methods: {', '.join(available_adapters())}")
    _console().print(f"drift detectors: {', '.join(available_detectors())}")


for _command in (generate, train, evaluate, adapt):
    app.command()(_command)
app.command("registry-init")(registry_init)
app.command("import-model")(import_model)


def main() -> None:
    """Console-script entry point."""
    app()
