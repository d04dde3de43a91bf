"""The ``terradapt`` command line (typer). Every command builds its dependencies from typed settings."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, help="terradapt: keep land-cover models accurate as they meet new regions.")


@functools.cache
def _console() -> Console:
    """The rich console, created on first use (its width is read from the terminal or COLUMNS then)."""
    return Console()


def _settings(config: Path | None) -> object:
    from stream.config import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


ConfigOption = Annotated[Path | None, typer.Option(help="TOML settings file (else TERRADAPT_CONFIG / env only)")]


@app.command()
def demo(
    dataset: Annotated[
        str | None, typer.Option(help="synthetic (FLAIR-format departements) or dubai (real areas); default: settings")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file ([demo] and every other section)")] = None,
    quick: Annotated[bool, typer.Option(help="tiny configuration (tests, smoke runs)")] = False,
    metrics_port: Annotated[int, typer.Option(help="serve Prometheus /metrics on this loopback port (0 = off)")] = 0,
) -> None:
    """Run the whole loop on embedded defaults: stream, detect drift, adapt, gate, deploy, report.

    Every setting applies (``TERRADAPT_MONITOR__ERT``, ``TERRADAPT_ADAPTATION__METHOD``...); ``[demo]`` /
    ``TERRADAPT_DEMO__*`` choose the scenario.
    """
    import torch

    from stream.config import QUICK_DEMO, Settings
    from stream.demo import run_demo

    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = _settings(config)
    assert isinstance(settings, Settings)
    update = dict(QUICK_DEMO) if quick else {}
    if dataset:
        update["dataset"] = dataset
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
def generate(
    out: Annotated[Path, typer.Argument(help="root folder of the FLAIR-layout dataset to write")],
    regions: Annotated[str, typer.Option(help="comma-separated departement codes")] = "D033,D040,D013,D067,D029",
    tiles: Annotated[int, typer.Option(help="tiles per region")] = 20,
    size: Annotated[int, typer.Option(help="tile size in pixels (FLAIR: 512)")] = 512,
    seed: int = 0,
) -> None:
    """Write synthetic FLAIR-format tiles (5-band uint8 GeoTIFF, EPSG:2154, FLAIR layout)."""
    from terradapt.datasets.synthetic import write_flair_dataset

    paths = write_flair_dataset(out, {r: tiles for r in regions.split(",")}, size=size, seed=seed)
    _console().print(f"wrote {len(paths)} files under {out}")


def _flair_samples(root: Path, regions: list[str] | None) -> tuple[object, list[object]]:
    from terradapt.datasets.flair import FlairDataset

    ds = FlairDataset(root)
    wanted = regions or ds.regions()
    return ds, [ds.load(r, t) for r in wanted for t in ds.tile_ids(r)]


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="FLAIR-layout root (real FLAIR or `terradapt generate` output)")],
    out: Annotated[Path, typer.Option(help="checkpoint folder to write")] = Path(".terradapt/source"),
    regions: Annotated[str | None, typer.Option(help="comma-separated source regions (default: all)")] = None,
    steps: int = 300,
    base_channels: int = 16,
    seed: int = 0,
) -> None:
    """Train a source model on FLAIR-layout data; writes weights.safetensors + manifest.json."""
    from terradapt.checkpoint import save_checkpoint
    from terradapt.datasets.base import Sample
    from terradapt.model import UNetConfig
    from terradapt.training import TrainConfig, train_source_checkpoint

    ds, samples = _flair_samples(data, regions.split(",") if regions else None)
    labelled = [s for s in samples if isinstance(s, Sample) and s.mask is not None]
    if not labelled:
        raise typer.BadParameter(f"no labelled tiles under {data}")
    classes = getattr(ds, "classes")  # noqa: B009
    bands = getattr(ds, "band_names")  # noqa: B009
    mcfg = UNetConfig(in_channels=len(bands), num_classes=len(classes), base_channels=base_channels)
    with Progress(console=_console()) as progress:
        task = progress.add_task("training", total=steps)
        model, manifest = train_source_checkpoint(
            [s.image for s in labelled],
            [s.mask for s in labelled if s.mask is not None],
            mcfg,
            TrainConfig(steps=steps, seed=seed),
            classes=classes,
            bands=bands,
            regions=tuple(sorted({s.region for s in labelled})),
            tile_ids=[f"{s.region}/{s.tile_id}" for s in labelled],
            progress=lambda step, loss: progress.update(task, completed=step),
        )
    saved = save_checkpoint(out, model, manifest)
    _console().print(f"saved {out} (sha256 {saved.sha256[:12]}...)")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="FLAIR-layout root with masks")],
    model_dir: Annotated[Path, typer.Option("--model", help="checkpoint folder")] = Path(".terradapt/source"),
    regions: Annotated[str | None, typer.Option(help="comma-separated regions (default: all)")] = None,
) -> None:
    """Print per-class IoU and mIoU per region."""
    from terradapt.checkpoint import load_checkpoint
    from terradapt.datasets.base import Sample
    from terradapt.training import evaluate as run_eval

    model, manifest = load_checkpoint(model_dir)
    _, samples = _flair_samples(data, regions.split(",") if regions else None)
    table = Table(title=f"evaluation of {model_dir}")
    table.add_column("region")
    for c in manifest.classes:
        table.add_column(c[:10])
    table.add_column("mIoU")
    by_region: dict[str, list[Sample]] = {}
    for s in samples:
        if isinstance(s, Sample) and s.mask is not None:
            by_region.setdefault(s.region, []).append(s)
    for region, group in sorted(by_region.items()):
        ev = run_eval(model, [s.image for s in group], [s.mask for s in group if s.mask is not None])
        cells = ["-" if v != v else f"{100 * v:.1f}" for v in ev.iou]
        table.add_row(region, *cells, f"{100 * ev.miou:.1f}")
    _console().print(table)


@app.command()
def adapt(
    data: Annotated[Path, typer.Argument(help="FLAIR-layout root holding the target region's tiles")],
    region: Annotated[str, typer.Option(help="target region code, e.g. D013")],
    model_dir: Annotated[Path, typer.Option("--model", help="source checkpoint folder")] = Path(".terradapt/source"),
    method: Annotated[
        str | None, typer.Option(help="adaptation method (default: the settings' for the region)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="where to write the adapted checkpoint")] = None,
    config: ConfigOption = None,
) -> None:
    """Adapt a checkpoint to one region's tiles with a registered method, gate it, and save it.

    The ``[adaptation]`` settings apply (method per region, method config, epochs, gate); ``--method`` replaces the
    region's method.
    """
    from adapters.buffer import BufferedTile
    from adapters.config import AdaptationConfig, RegionMethod
    from adapters.policy import run_adaptation
    from stream.config import Settings
    from terradapt.checkpoint import ModelManifest, load_checkpoint
    from terradapt.datasets.base import Sample
    from terradapt.records import AdaptationJob, DriftEvent

    settings = _settings(config)
    assert isinstance(settings, Settings)
    cfg: AdaptationConfig = settings.adaptation
    if method is not None:
        per_region = {**cfg.per_region, region: RegionMethod(method=method)}
        cfg = cfg.model_copy(update={"per_region": per_region})
    method = cfg.method_for(region).method
    model, manifest = load_checkpoint(model_dir)
    _, samples = _flair_samples(data, [region])
    tiles = [BufferedTile(s.tile_id, s.image) for s in samples if isinstance(s, Sample)]
    trigger = DriftEvent(
        region=region,
        acquisition_id="manual",
        tiles_seen=len(tiles),
        signal="manual",
        score=0.0,
        threshold=0.0,
    )
    job = AdaptationJob(
        job_id=f"manual-{region}-{method}",
        region=region,
        base_version=manifest.version,
        method=method,
        tile_ids=tuple(t.acquisition_id for t in tiles),
        trigger=trigger,
    )
    outcome = run_adaptation(job, model, manifest, tiles, cfg)
    verdict = "accepted" if outcome.gate.accepted else "REJECTED: " + "; ".join(outcome.gate.reasons)
    _console().print(f"gate: {verdict}")
    _console().print(json.dumps(outcome.gate.metrics, indent=2))
    target = out or model_dir.parent / f"{region}-{method}"
    target.mkdir(parents=True, exist_ok=True)
    (target / "weights.safetensors").write_bytes(outcome.weights)
    (target / "manifest.json").write_text(ModelManifest.model_dump_json(outcome.manifest, indent=2))
    _console().print(f"saved {target}")


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


@app.command("registry-init")
def registry_init(
    model_dir: Annotated[Path, typer.Option("--model", help="source checkpoint folder")],
    data: Annotated[Path, typer.Option(help="FLAIR-layout root with held-out source tiles for calibration")],
    regions: Annotated[str | None, typer.Option(help="comma-separated source regions to calibrate on")] = None,
    config: ConfigOption = None,
) -> None:
    """Publish the source model to the MinIO registry and calibrate the drift monitor on held-out source tiles.

    The calibration tiles must be held out: a tile the source model trained on (its manifest lists them) is
    refused, and fewer than 150 tiles is a warning (looser thresholds).
    """
    from serving.minio_store import MinioStore, minio_client
    from serving.registry import ModelRegistry
    from stream.bootstrap import bootstrap_registry
    from stream.config import Settings
    from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest
    from terradapt.datasets.base import Sample

    settings = _settings(config)
    assert isinstance(settings, Settings)
    registry = ModelRegistry(MinioStore(minio_client(settings.s3), settings.s3.bucket_models))
    manifest = ModelManifest.model_validate_json((model_dir / MANIFEST_FILE).read_bytes())
    _, samples = _flair_samples(data, regions.split(",") if regions else None)
    tiles = [s for s in samples if isinstance(s, Sample)]
    # labels, when every calibration tile has one, give the source confusion matrix for label-shift estimates
    masks = [s.mask for s in tiles if s.mask is not None]
    try:
        version, calibration = bootstrap_registry(
            registry,
            (model_dir / WEIGHTS_FILE).read_bytes(),
            manifest,
            [s.image for s in tiles],
            tile_ids=[f"{s.region}/{s.tile_id}" for s in tiles],
            masks=masks if len(masks) == len(tiles) else None,
            seed=settings.runtime.seed,
            device=settings.runtime.device,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _console().print(
        f"source model {version.href} (sha256 {version.sha256[:12]}...), calibrated on {calibration.tiles} tiles"
    )


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="GeoTIFF files to ingest")],
    region: Annotated[str, typer.Option(help="region code, e.g. D033")],
    config: ConfigOption = None,
) -> None:
    """Upload GeoTIFFs to MinIO and publish their STAC items on the acquisitions topic (key = region)."""
    from serving.minio_store import MinioStore, minio_client
    from stream.config import Settings
    from stream.kafka.ingest import ingest as run_ingest
    from stream.kafka.ingest import make_producer
    from stream.topics import Topics

    settings = _settings(config)
    assert isinstance(settings, Settings)
    store = MinioStore(minio_client(settings.s3), settings.s3.bucket_acquisitions)
    producer = make_producer(settings.kafka.bootstrap)
    topic = Topics.with_prefix(settings.kafka.topic_prefix).acquisitions
    with Progress(console=_console()) as progress:
        task = progress.add_task(f"ingesting {region}", total=len(paths))
        acqs = run_ingest(paths, region, store, producer, topic, lambda _: progress.advance(task))
    producer.close()
    _console().print(f"published {len(acqs)} acquisitions to {topic}")


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
    producer = make_producer(settings.kafka.bootstrap)
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


def main() -> None:
    """Console-script entry point."""
    app()
