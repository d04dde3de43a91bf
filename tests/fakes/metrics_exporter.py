"""A real terradapt process serving /metrics, for the Prometheus test (until the runners export metrics).

It runs the embedded demo (``stream.demo.run_demo``) on a tiny configuration with ``ServiceMetrics`` wired into
the real pipeline (the embedded runner joins each tile's reference mask a few tiles after its prediction, as
delayed labels arrive). One corrupt acquisition is appended to the stream to exercise the dead-letter path.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from monitoring.dashboard import dashboard_state, write_state
from monitoring.metrics import ServiceMetrics


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run(root: Path, metrics: ServiceMetrics, *, stream_tiles: int = 24) -> dict[str, Any]:
    """Run the tiny embedded demo with ``metrics`` wired into its pipeline; return a summary of what happened."""
    from serving.store import FileSystemStore
    from stream.build import embedded_runner
    from stream.config import Settings
    from stream.demo import demo_settings, fresh_registry
    from stream.embedded import StreamItem
    from stream.observer import MetricsObserver
    from stream.scenarios import acquisitions, scenario, source_model

    settings = Settings.model_validate(
        {
            "demo": {
                "tile_size": 64,
                "train_tiles": 4,
                "calibration_tiles": 64,
                "stream_tiles": stream_tiles,
                "eval_tiles": 2,
                "train_steps": 10,
                "base_channels": 4,
                "workdir": root / "work",
                "cache_dir": root / "cache",
                "report_dir": root / "report",
            },
            "trigger": {"min_tiles": 6},  # adapt early (6 tiles after detection): the adapted version gets labels too
            "runtime": {"device": "cpu"},
            # a 10-step model: its candidates are judged by the class-mix heuristics (this run exercises the
            # metrics of every stage, rollouts included, not the label-free selection, which has its own tests)
            "adaptation": {"device": "cpu", "gate": {"selection": {"enabled": False}}},
        }
    )
    sc = scenario(settings.demo)
    model, manifest, _ = source_model(settings.demo, sc, device="cpu")
    settings = demo_settings(settings, sc)
    registry = fresh_registry(settings, sc, model, manifest)
    runner = embedded_runner(
        settings,
        registry,
        FileSystemStore(root / "work" / "predictions"),
        spec=sc.spec,
        observer=MetricsObserver(metrics),
    )

    def items() -> Iterator[StreamItem]:
        last: StreamItem | None = None
        for item in acquisitions(sc.streams, sc.bands):
            last = item
            yield item
        if last is not None:  # one corrupt GeoTIFF: exercises the dead-letter path of the real runner
            bad = last.acquisition.model_copy(update={"id": last.acquisition.id + "-corrupt"})
            yield StreamItem(bad, b"II*\x00 truncated", None)

    run_ = runner.run(items())
    write_state(dashboard_state(run_, registry, title="terradapt test run"), root / "state.json")
    joined = sum(
        s.value
        for fam in metrics.registry.collect()
        if fam.name == "terradapt_labelled_tiles"
        for s in fam.samples
        if s.name.endswith("_total") and s.labels.get("outcome") == "joined"
    )
    return {
        "tiles": len(run_.tiles),
        "tiles_by_region": {r: sum(t.region == r for t in run_.tiles) for r in {t.region for t in run_.tiles}},
        "drift_events": len(run_.drift_events),
        "adaptations": [(v.region, v.method, v.accepted) for v in run_.adaptations],
        "rollouts": [(e.region, e.version, e.step.value) for e in run_.rollouts],
        "dead_letters": [d.reason for d in run_.dead_letters],
        "joined": int(joined),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stream-tiles", type=int, default=24)
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
