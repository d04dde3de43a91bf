"""A real terradapt process serving /metrics, for the Prometheus test (until the runners export metrics).

It runs the embedded demo (``stream.demo.run_demo``) on a tiny configuration and feeds ``ServiceMetrics`` from the
real pipeline stages. ``MeteredPipeline`` below is the reference for wiring the metrics into ``stream.pipeline`` /
``stream.embedded``: each override shows which ``ServiceMetrics`` call belongs to which stage. Delayed labels are
simulated the way they arrive in production: the reference mask of a tile is joined ``LABEL_DELAY`` tiles later,
by acquisition id, with the prediction COG the pipeline stored (read back from the prediction store), through
``DelayedLabelTracker``. One corrupt acquisition is appended to the stream to exercise the dead-letter path.

Usage::

    python tests/fakes/metrics_exporter.py --root DIR [--port 0]

Files written under DIR: ``exporter.json`` (``{"port", "pid"}``) once /metrics is served; ``state.json`` (the
dashboard state) and ``done.json`` (a summary of what was exported) when the run has ended. It then serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import rasterio
from prometheus_client import CollectorRegistry

from monitoring.accuracy import DelayedLabelTracker, PendingPrediction
from monitoring.dashboard import dashboard_state, write_state
from monitoring.metrics import ServiceMetrics

LABEL_DELAY = 3  # tiles between a tile's prediction and the arrival of its reference mask


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_prediction(p: PendingPrediction) -> np.ndarray:
    """Fetch a stored prediction COG (file:// URI written by the pipeline's prediction store)."""
    if p.href is None:
        raise ValueError(f"prediction {p.acquisition_id} was not stored")
    with rasterio.open(urlparse(p.href).path) as src:
        return src.read(1)


def run(root: Path, metrics: ServiceMetrics, *, stream_tiles: int = 16) -> dict[str, Any]:
    """Run the tiny demo with metrics wired into the pipeline; return a summary of what was exported."""
    import stream.demo as demo
    from stream.embedded import StreamItem, TileLog
    from stream.pipeline import Adapted, Observed, Pipeline, Predicted
    from terradapt.errors import TerradaptError
    from terradapt.raster import Raster
    from terradapt.records import Acquisition, AdaptationJob, FeatureStats, ModelVersion, RolloutEvent

    state: dict[str, Any] = {"tracker": None, "t0": {}, "joined": 0, "labels": 0}
    masks: dict[str, np.ndarray] = {}
    waiting: deque[str] = deque()

    def tracker(num_classes: int) -> DelayedLabelTracker:
        if state["tracker"] is None:
            state["tracker"] = DelayedLabelTracker(num_classes, window=20, fetch=_read_prediction)
        t: DelayedLabelTracker = state["tracker"]
        return t

    def deliver_label(acquisition_id: str, region: str) -> None:
        mask = masks.pop(acquisition_id, None)
        if mask is None or state["tracker"] is None:
            return
        join = state["tracker"].add_label(acquisition_id, mask)
        state["labels"] += 1
        metrics.observe_label(region, join.outcome)
        if join.window is not None:
            state["joined"] += 1
            w = join.window
            metrics.observe_accuracy(w.region, w.version, w.accuracy, w.miou, w.tiles)

    class MeteredPipeline(Pipeline):
        """The shared pipeline with a ServiceMetrics call at the end of each stage."""

        def read(self, acq: Acquisition, data: bytes | str) -> Raster:
            t0 = time.perf_counter()
            state["t0"][acq.id] = t0
            try:
                raster = super().read(acq, data)
            except TerradaptError as exc:
                elapsed = time.perf_counter() - t0
                metrics.observe_stage("read", elapsed)
                metrics.observe_dead_letter(exc.reason)
                metrics.observe_tile(acq.region, elapsed, "dead_letter")
                raise
            metrics.observe_stage("read", time.perf_counter() - t0)
            return raster

        def predict(self, acq: Acquisition, raster: Raster) -> Predicted:
            predicted = super().predict(acq, raster)
            p = predicted.prediction
            metrics.observe_stage("predict", p.latency_s)
            metrics.observe_prediction(acq.region, p.model_version, predicted.features.mean_confidence)
            tracker(len(p.class_shares)).record(p)  # class map fetched from p.href when the label arrives
            return predicted

        def observe(
            self, acq: Acquisition, features: FeatureStats, monitor: Any, trigger: Any, buffered: Sequence[Any]
        ) -> Observed:
            t0 = time.perf_counter()
            observed = super().observe(acq, features, monitor, trigger, buffered)
            metrics.observe_stage("observe", time.perf_counter() - t0)
            u = observed.update
            metrics.observe_drift(acq.region, u.scores, u.thresholds, u.fired, newly_detected=u.newly_detected)
            return observed

        def adapt(self, job: AdaptationJob, tiles: Sequence[Any]) -> Adapted:
            t0 = time.perf_counter()
            try:
                adapted = super().adapt(job, tiles)
            except Exception:
                metrics.observe_adaptation(job.region, job.method, "failed", time.perf_counter() - t0)
                raise
            outcome = "accepted" if adapted.gate.accepted else "rejected"
            metrics.observe_adaptation(job.region, job.method, outcome, time.perf_counter() - t0)
            return adapted

        def deploy(self, version: ModelVersion) -> RolloutEvent | None:
            event = super().deploy(version)
            if event is not None:
                metrics.observe_rollout(event)
            return event

    original_acquisitions = demo._acquisitions

    def acquisitions(sc: Any, spec: Any) -> Iterator[StreamItem]:
        last: StreamItem | None = None
        for item in original_acquisitions(sc, spec):
            if item.mask is not None:
                masks[item.acquisition.id] = item.mask
            last = item
            yield item
        if last is not None:  # one corrupt GeoTIFF: exercises the dead-letter path of the real runner
            bad = last.acquisition.model_copy(update={"id": last.acquisition.id + "-corrupt"})
            yield StreamItem(bad, b"II*\x00 truncated", None)

    def on_tile(log: TileLog) -> None:
        t0 = state["t0"].pop(log.acquisition_id, None)
        if t0 is not None:
            metrics.observe_tile(log.region, time.perf_counter() - t0, "ok")
        waiting.append(f"{log.region}\t{log.acquisition_id}")
        while len(waiting) > LABEL_DELAY:
            region, acq_id = waiting.popleft().split("\t")
            deliver_label(acq_id, region)

    demo.Pipeline = MeteredPipeline  # type: ignore[misc]
    demo._acquisitions = acquisitions
    try:
        cfg = demo.DemoConfig(
            tile_size=64,
            train_tiles=4,
            calibration_tiles=16,
            stream_tiles=stream_tiles,
            eval_tiles=2,
            train_steps=10,
            base_channels=4,
            workdir=root / "work",
            cache_dir=root / "cache",
            report_dir=root / "report",
        )
        result = demo.run_demo(cfg, on_tile=on_tile)
    finally:
        demo.Pipeline = Pipeline  # type: ignore[misc]
        demo._acquisitions = original_acquisitions
    while waiting:  # the remaining labels arrive after the stream
        region, acq_id = waiting.popleft().split("\t")
        deliver_label(acq_id, region)
    write_state(dashboard_state(result.run, rows=result.rows, title="terradapt test run"), root / "state.json")
    run_ = result.run
    return {
        "tiles": len(run_.tiles),
        "tiles_by_region": {r: sum(t.region == r for t in run_.tiles) for r in {t.region for t in run_.tiles}},
        "drift_events": len(run_.drift_events),
        "adaptations": [(a.version.region, a.version.method, a.gate.accepted) for a in run_.adaptations],
        "rollouts": [(e.region, e.version, e.step.value) for e in run_.rollouts],
        "dead_letters": [d.reason for d in run_.dead_letters],
        "labels": state["labels"],
        "joined": state["joined"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stream-tiles", type=int, default=16)
    args = parser.parse_args(argv)
    root: Path = args.root
    root.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    metrics = ServiceMetrics(CollectorRegistry())
    server = metrics.serve(args.port)
    _write_json(root / "exporter.json", {"port": server.port, "pid": os.getpid()})
    print(f"serving {server.url}", file=sys.stderr, flush=True)
    try:
        t0 = time.perf_counter()
        summary = run(root, metrics, stream_tiles=args.stream_tiles)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        _write_json(root / "done.json", summary)
        print(f"done: {summary}", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
