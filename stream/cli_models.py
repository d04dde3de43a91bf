"""The model-lifecycle commands of ``terradapt``: generate data, train, evaluate, adapt, publish + calibrate.

Registered on the app by ``stream.cli`` (``terradapt generate|train|evaluate|adapt|registry-init``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from stream.cli_common import ConfigOption, _console, _settings


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


def train(
    data: Annotated[Path, typer.Argument(help="FLAIR-layout root (real FLAIR or `terradapt generate` output)")],
    out: Annotated[Path, typer.Option(help="checkpoint folder to write")] = Path(".terradapt/source"),
    regions: Annotated[str | None, typer.Option(help="comma-separated source regions (default: all)")] = None,
    steps: int = 300,
    base_channels: int = 16,
    arch: Annotated[
        str,
        typer.Option(help="small (default), flair-baseline, or smp:<Arch>:<encoder> (e.g. smp:DeepLabV3Plus:resnet18)"),
    ] = "small",
    crop: Annotated[
        int | None, typer.Option(help="training crop in pixels (default 128; the preset's tile size)")
    ] = None,
    seed: int = 0,
    protocol: Annotated[
        str, typer.Option(help="registered source-training protocol (an unknown name lists them all)")
    ] = "erm",
    protocol_config: Annotated[
        str | None, typer.Option(help='the protocol config as JSON, e.g. {"penalty_weight": 10}')
    ] = None,
    calibration_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.95,
            help="share of every source region's tiles held out of training (seeded shuffle) for registry-init",
        ),
    ] = 0.5,
) -> None:
    """Train a source model on FLAIR-layout data; writes weights.safetensors + manifest.json.

    A seeded, shuffled share of every region's labelled tiles is held out and listed in the manifest
    (``calibration_tiles``): ``terradapt registry-init`` calibrates the drift monitor on them, since tiles the model
    trained on would make it look more certain than on anything it will ever stream. Regions are the domains of
    the ``irm`` and ``reptile`` protocols.
    """
    from monitoring.calibration import RECOMMENDED_TILES
    from terradapt.architectures import ArchitectureError, resolve_arch
    from terradapt.checkpoint import save_checkpoint
    from terradapt.datasets.base import Sample
    from terradapt.errors import UnknownNameError
    from terradapt.protocols import create_protocol
    from terradapt.training import TrainConfig, holdout_split, train_source_checkpoint

    try:
        method_config = json.loads(protocol_config) if protocol_config else {}
        create_protocol(protocol, method_config)  # a bad name or config fails before any tile is read
    except UnknownNameError as exc:
        raise typer.BadParameter(str(exc), param_hint="--protocol") from exc
    except ValueError as exc:  # invalid JSON or a config the protocol rejects (pydantic errors are ValueErrors)
        raise typer.BadParameter(str(exc), param_hint="--protocol-config") from exc
    ds, samples = _flair_samples(data, regions.split(",") if regions else None)
    labelled = [s for s in samples if isinstance(s, Sample) and s.mask is not None]
    if not labelled:
        raise typer.BadParameter(f"no labelled tiles under {data}")
    kept, held = holdout_split([s.region for s in labelled], calibration_fraction, seed)
    train_set, calibration = [labelled[i] for i in kept], [labelled[i] for i in held]
    classes = getattr(ds, "classes")  # noqa: B009
    bands = getattr(ds, "band_names")  # noqa: B009
    try:
        spec = resolve_arch(arch, in_channels=len(bands), num_classes=len(classes), base_channels=base_channels)
    except ArchitectureError as exc:
        raise typer.BadParameter(str(exc), param_hint="--arch") from exc
    size = min(s.image.shape[-1] for s in train_set)
    crop_px = min(crop or spec.tile_size or 128, size)
    with Progress(console=_console()) as progress:
        task = progress.add_task(f"training {arch} ({protocol})", total=steps)
        model, manifest = train_source_checkpoint(
            [s.image for s in train_set],
            [s.mask for s in train_set if s.mask is not None],
            spec.config,
            TrainConfig(steps=steps, seed=seed, crop=crop_px, batch_size=8 if crop_px <= 128 else 2),
            classes=classes,
            bands=bands,
            regions=tuple(sorted({s.region for s in train_set})),
            tile_ids=[f"{s.region}/{s.tile_id}" for s in train_set],
            progress=lambda step, loss: progress.update(task, completed=step),
            protocol=protocol,
            protocol_config=method_config,
            domains=[s.region for s in train_set],
            calibration_tiles=[f"{s.region}/{s.tile_id}" for s in calibration],
            normalisation=spec.normalisation,
        )
    saved = save_checkpoint(out, model, manifest)
    _console().print(
        f"saved {out} (sha256 {saved.sha256[:12]}..., protocol {protocol}): trained on {len(train_set)} tiles, "
        f"{len(calibration)} held out for calibration"
    )
    if len(calibration) < RECOMMENDED_TILES:
        _console().print(
            f"[yellow]warning:[/] {len(calibration)} held-out calibration tiles; {RECOMMENDED_TILES} or more are "
            "recommended (drift thresholds come out looser with fewer): generate more tiles per region or raise "
            "--calibration-fraction"
        )


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


def registry_init(
    model_dir: Annotated[Path, typer.Option("--model", help="source checkpoint folder")],
    data: Annotated[Path, typer.Option(help="FLAIR-layout root with held-out source tiles for calibration")],
    regions: Annotated[str | None, typer.Option(help="comma-separated source regions to calibrate on")] = None,
    held_out: Annotated[
        bool,
        typer.Option(
            "--held-out/--all-tiles",
            help="calibrate on the manifest's calibration_tiles found under --data (default), or on every tile",
        ),
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Publish the source model to the MinIO registry and calibrate the drift monitor on held-out source tiles.

    By default the calibration uses the tiles ``terradapt train`` held out (the manifest's ``calibration_tiles``)
    among those under ``--data``; when none of them is there, every tile given is used. Either way a tile the
    source model trained on (the manifest lists them) is refused, and fewer than
    ``monitoring.calibration.RECOMMENDED_TILES`` tiles is a warning (looser thresholds).
    """
    from monitoring.calibration import RECOMMENDED_TILES
    from serving.minio_store import MinioStore, minio_client
    from serving.registry import ModelRegistry
    from stream.bootstrap import bootstrap_registry
    from stream.config import Settings
    from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest
    from terradapt.datasets.base import Sample

    settings = _settings(config)
    assert isinstance(settings, Settings)
    manifest = ModelManifest.model_validate_json((model_dir / MANIFEST_FILE).read_bytes())
    _, samples = _flair_samples(data, regions.split(",") if regions else None)
    tiles = [s for s in samples if isinstance(s, Sample)]
    if held_out and manifest.calibration_tiles:
        recorded = set(manifest.calibration_tiles)
        chosen = [s for s in tiles if f"{s.region}/{s.tile_id}" in recorded]
        if chosen:
            _console().print(
                f"calibrating on the {len(chosen)} held-out tiles of the manifest found under {data} "
                f"({len(recorded)} recorded)"
            )
            tiles = chosen
        else:
            _console().print(
                f"[yellow]warning:[/] none of the manifest's {len(recorded)} calibration tiles is under {data}: "
                "calibrating on every tile given (training tiles are refused)"
            )
    if len(tiles) < RECOMMENDED_TILES:
        _console().print(
            f"[yellow]warning:[/] calibrating on {len(tiles)} tiles; {RECOMMENDED_TILES} or more held-out source "
            "tiles are recommended (drift thresholds come out looser with fewer): generate more tiles per region, "
            "or train with a larger --calibration-fraction"
        )
    registry = ModelRegistry(MinioStore(minio_client(settings.s3), settings.s3.bucket_models))
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
            selection_methods=settings.adaptation.methods(),
            selection=settings.adaptation.gate.selection,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _console().print(
        f"source model {version.href} (sha256 {version.sha256[:12]}...), calibrated on {calibration.tiles} tiles"
    )


def import_model(
    checkpoint: Annotated[Path, typer.Argument(help="a PyTorch state dict (.pt/.pth/.ckpt) or .safetensors file")],
    arch: Annotated[str, typer.Option(help="flair-baseline, smp:<Arch>:<encoder>, or small")],
    out: Annotated[Path, typer.Option(help="checkpoint folder to write")] = Path(".terradapt/imported"),
    classes: Annotated[str | None, typer.Option(help="comma-separated class names (default: FLAIR's 13)")] = None,
    bands: Annotated[str | None, typer.Option(help="comma-separated band names (default: FLAIR's 5)")] = None,
    mean: Annotated[str | None, typer.Option(help="per-band normalisation means, raw units (preset's)")] = None,
    std: Annotated[str | None, typer.Option(help="per-band normalisation stds, raw units (preset's)")] = None,
    prefix: Annotated[
        str | None, typer.Option(help="key prefix to strip, e.g. 'model.' (default: found automatically)")
    ] = None,
    allow_unexpected: Annotated[
        bool, typer.Option(help="ignore checkpoint keys the architecture does not have (e.g. a loss module's)")
    ] = False,
) -> None:
    """Convert your trained model's checkpoint into weights.safetensors + manifest.json.

    Loads with ``torch.load(weights_only=True)`` only (a checkpoint that needs code to unpickle is refused),
    strips a wrapper prefix (``model.``), reports missing/unexpected keys, records the file's sha256. Then
    ``terradapt registry-init --model OUT --data ...`` calibrates it (and, with labelled tiles, stores the class
    look the radiometry signal needs) and the stream uses it.
    """
    from terradapt.architectures import ArchitectureError, resolve_arch
    from terradapt.checkpoint import save_checkpoint
    from terradapt.classes import FLAIR_BANDS, FLAIR_CLASSES
    from terradapt.importing import CheckpointImportError, UnsafeCheckpointError, import_checkpoint

    class_names = tuple(classes.split(",")) if classes else FLAIR_CLASSES
    band_names = tuple(bands.split(",")) if bands else FLAIR_BANDS
    try:
        spec = resolve_arch(arch, in_channels=len(band_names), num_classes=len(class_names))
        norm = (_floats(mean, "--mean"), _floats(std, "--std")) if mean or std else None
        model, manifest, report = import_checkpoint(
            checkpoint,
            spec,
            classes=class_names,
            bands=band_names,
            normalisation=norm,
            prefix=prefix,
            allow_unexpected=allow_unexpected,
        )
    except (ArchitectureError, CheckpointImportError, UnsafeCheckpointError) as exc:
        _console().print(f"[red]import refused:[/] {exc}")
        raise typer.Exit(code=2) from exc
    saved = save_checkpoint(out, model, manifest)
    ignored = f"; ignored {len(report.ignored)} unexpected key(s)" if report.ignored else ""
    _console().print(
        f"imported {checkpoint} (sha256 {report.sha256[:12]}...) as {manifest.architecture} "
        f"{dict(manifest.config)}: {report.loaded} tensors, prefix {report.prefix!r}{ignored}; saved {out} "
        f"(weights sha256 {saved.sha256[:12]}...)"
    )


def _floats(text: str | None, name: str) -> tuple[float, ...]:
    if not text:
        raise typer.BadParameter("give both --mean and --std", param_hint=name)
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise typer.BadParameter(f"comma-separated numbers expected, got {text!r}", param_hint=name) from exc
