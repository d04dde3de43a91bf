"""``terradapt demo --task crops``: run the crop demo with a progress log and print its per-country table."""

from __future__ import annotations

from rich.table import Table

from stream.cli_common import _console
from stream.crops.config import QUICK_CROP_DEMO, CropLoopConfig

__all__ = ["crop_demo"]


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
