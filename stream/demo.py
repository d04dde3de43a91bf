"""The demo: the whole terradapt loop on embedded defaults (no services).

A scenario (``stream.scenarios``: synthetic FLAIR-format departements, or the real Dubai areas) streams in; the
source model is trained (or loaded from the cache) and bootstrapped into a fresh file-system registry with its
calibration (``stream.bootstrap``); the embedded runner drives the same pipeline as the Kafka workers, configured
by the same settings; per-region mIoU of the source model and of the region's final model is measured on held-out
labelled tiles of that region, and a report and a dashboard state file are written.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from monitoring.dashboard import dashboard_state, write_state
from serving.registry import ModelRegistry
from serving.store import FileSystemStore
from stream.bootstrap import bootstrap_registry
from stream.build import embedded_runner
from stream.config import Settings
from stream.embedded import RunResult, TileLog
from stream.observer import PipelineObserver
from stream.report import RegionRow, write_report
from stream.scenarios import Scenario, acquisitions, scenario, source_model, tile_key
from terradapt.checkpoint import ModelManifest, encode
from terradapt.model import SegmentationModel
from terradapt.training import evaluate


@dataclass
class DemoResult:
    """What the demo returns (also written to the report)."""

    rows: list[RegionRow]
    run: RunResult
    report: Path
    cached_model: bool


def demo_settings(settings: Settings, sc: Scenario) -> Settings:
    """The settings with the scenario's raster contract (bands, CRS) and regions."""
    stream = settings.stream.model_copy(
        update={
            "band_count": len(sc.bands),
            "expected_crs": sc.spec.expected_crs if sc.spec.require_crs else None,
            "regions": tuple(sc.streams),
        }
    )
    return settings.model_copy(update={"stream": stream})


def run_demo(
    settings: Settings,
    *,
    on_train: Callable[[int, float], None] | None = None,
    on_tile: Callable[[TileLog], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    observer: PipelineObserver | None = None,
) -> DemoResult:
    """Run the whole loop on ``settings.demo``'s scenario and write the report."""
    stage = on_stage or (lambda _: None)
    cfg = settings.demo
    stage("generating data")
    sc = scenario(cfg)
    stage("source model")
    model, manifest, cached = source_model(cfg, sc, on_train, settings.runtime.device)
    rows, result, registry = run_stream(
        settings, sc, model, manifest, on_tile=on_tile, on_stage=stage, observer=observer
    )
    title = f"terradapt demo - {sc.name}"
    report = write_report(cfg.report_dir, result, rows, title)
    write_state(dashboard_state(result, registry, rows=rows, title=title), cfg.report_dir / "state.json")
    return DemoResult(rows, result, report, cached)


def fresh_registry(
    settings: Settings, sc: Scenario, model: SegmentationModel, manifest: ModelManifest
) -> ModelRegistry:
    """A new file-system registry under ``demo.workdir`` with the source model, calibrated on ``sc.calibration``.

    With labelled calibration tiles the calibration also holds the source confusion matrix (label-shift estimates).
    """
    workdir = settings.demo.workdir
    if workdir.exists():
        shutil.rmtree(workdir)
    registry = ModelRegistry(FileSystemStore(workdir / "registry"))
    weights, manifest_json = encode(model, manifest)
    masks = [s.mask for s in sc.calibration if s.mask is not None]
    bootstrap_registry(
        registry,
        weights,
        ModelManifest.model_validate_json(manifest_json),
        [s.image for s in sc.calibration],
        tile_ids=[tile_key(s) for s in sc.calibration],
        masks=masks if len(masks) == len(sc.calibration) else None,
        seed=settings.demo.seed,
        device=settings.runtime.device,
        selection_methods=settings.adaptation.methods(),
        selection=settings.adaptation.gate.selection,
    )
    return registry


def run_stream(
    settings: Settings,
    sc: Scenario,
    model: SegmentationModel,
    manifest: ModelManifest,
    *,
    on_tile: Callable[[TileLog], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    observer: PipelineObserver | None = None,
) -> tuple[list[RegionRow], RunResult, ModelRegistry]:
    """The system's loop on a scenario: fresh registry, calibration, stream, evaluation on held-out tiles.

    What ``bench/adaptation.py`` measures as the terradapt system (monitor + trigger + method + gate).
    """
    stage = on_stage or (lambda _: None)
    stage("calibrating drift tests on held-out source tiles")
    settings = demo_settings(settings, sc)
    registry = fresh_registry(settings, sc, model, manifest)
    predictions = FileSystemStore(settings.demo.workdir / "predictions")
    runner = embedded_runner(
        settings,
        registry,
        predictions,
        spec=sc.spec,
        observer=observer,
        label_delay=settings.demo.label_delay,
        on_tile=on_tile,
    )
    stage("streaming acquisitions")
    result = runner.run(acquisitions(sc.streams, sc.bands))
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
        versions = [v for v in result.adaptations if v.region == region]
        gate = (
            "-"
            if not versions
            else ("accepted" if versions[-1].accepted else "rejected: " + versions[-1].gate_reasons[0])
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
