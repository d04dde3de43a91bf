"""Types and the docs/benchmarks.md section of ``bench/model_serving.py`` (what was measured, and how it reads)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import Stats  # noqa: E402

NAME = "model_serving"
WARMUP = 2


@dataclass(frozen=True)
class ModelSpec:
    key: str  # --arch value
    region: str  # registry / TorchServe region of this model (model name landcover-<region>)
    label: str


MODELS = (
    ModelSpec("small", "D033", "small U-Net (base 16, depth 3)"),
    ModelSpec("flair-baseline", "D034", "flair-baseline (smp Unet + resnet34)"),
)


@dataclass
class InProcess:
    device: str
    threads: int
    forward: Stats
    predict: Stats
    rss_start_mib: float  # VmRSS after imports
    rss_loaded_mib: float  # VmRSS after the model is loaded
    hwm_load_mib: float  # VmHWM after the model is loaded (imports + load)
    hwm_predict_mib: float  # VmHWM after warm-up + timed predictions (since the reset after loading, if it worked)
    hwm_reset: bool  # whether /proc/self/clear_refs reset the high-water mark after loading
    cuda_peak_mib: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InProcess:
        return cls(**{**d, "forward": Stats(**d["forward"]), "predict": Stats(**d["predict"])})


@dataclass
class Served:
    latency: Stats
    handler: Stats
    register_s: float
    worker_hwm_mib: float
    workers: int
    worker_omp: str  # OMP_NUM_THREADS in the worker's environment


@dataclass
class Row:
    spec: ModelSpec
    params: int
    weights_mib: float
    cpu: InProcess | None = None
    cuda: InProcess | None = None
    served: Served | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class Run:
    rows: list[Row]
    info: dict[str, str]
    gpu: str
    load_before: str
    load_after: str = ""
    seconds: float = 0.0
    torchserve_error: str = ""
    torchserve_start_s: float = 0.0


def _ms(s: Stats | None) -> str:
    return "n/a" if s is None else f"{s.p50_ms:.0f} / {s.mean_ms:.0f}"


def _rss(m: InProcess | None) -> str:
    return "n/a" if m is None else f"{_peak(m):.0f} (+{m.hwm_predict_mib - m.rss_loaded_mib:.0f})"


def _peak(m: InProcess) -> float:
    return max(m.hwm_load_mib, m.hwm_predict_mib)


def _forward(row: Row) -> Stats | None:
    return row.cpu.forward if row.cpu else None


def _predict(row: Row) -> Stats | None:
    return row.cpu.predict if row.cpu else None


def _served(row: Row) -> Stats | None:
    return row.served.latency if row.served else None


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.1f}x"


def notes(result: Run) -> list[str]:
    by_key = {row.spec.key: row for row in result.rows}
    small, flair = by_key.get("small"), by_key.get("flair-baseline")
    out: list[str] = []
    if small and flair:

        def mean(row: Row, what: Callable[[Row], Stats | None]) -> float | None:
            s = what(row)
            return None if s is None else s.mean_ms

        fwd = _ratio(mean(flair, _forward), mean(small, _forward))
        prd = _ratio(mean(flair, _predict), mean(small, _predict))
        srv = _ratio(mean(flair, _served), mean(small, _served))
        out.append(
            f"flair-baseline / small, per tile on this CPU: forward {fwd}, in-process predict {prd}, TorchServe "
            f"{srv}; parameters {flair.params / max(small.params, 1):.0f}x."
        )
        if flair.cpu and small.cpu:
            out.append(
                f"{flair.params / max(small.params, 1):.0f}x the parameters but {fwd} the forward time: CPU time "
                "follows the convolution work per pixel, not the weight count (the small U-Net's 16-channel "
                "convolutions run at full tile resolution; resnet34 is at 1/4 resolution after its stem)."
            )
            extra_small = small.cpu.predict.mean_ms - small.cpu.forward.mean_ms
            extra_flair = flair.cpu.predict.mean_ms - flair.cpu.forward.mean_ms
            out.append(
                f"predict - forward (drift features, class map, copies): {extra_small:.0f} ms (small), "
                f"{extra_flair:.0f} ms (flair-baseline) per tile."
            )
            grow_flair = _peak(flair.cpu) - flair.cpu.rss_start_mib
            grow_small = _peak(small.cpu) - small.cpu.rss_start_mib
            out.append(
                f"In-process memory: loading + predicting adds {grow_flair:.0f} MiB to the child process for "
                f"flair-baseline, {grow_small:.0f} MiB for small (process after imports: "
                f"{small.cpu.rss_start_mib:.0f} MiB)."
            )
        if flair.served and small.served:
            out.append(
                f"TorchServe worker peak RSS: {flair.served.worker_hwm_mib:.0f} MiB (flair-baseline) vs "
                f"{small.served.worker_hwm_mib:.0f} MiB (small); both include the worker's Python + torch runtime."
            )
    for row in result.rows:
        if row.served and row.cpu:
            overhead = row.served.latency.mean_ms - row.served.handler.mean_ms
            ratio = _ratio(row.served.latency.mean_ms, row.cpu.predict.mean_ms)
            out.append(
                f"{row.spec.key}: TorchServe / in-process predict {ratio} per tile; outside the handler's "
                f"compute (GeoTIFF encode, HTTP, JSON answer and its decode) {overhead:.0f} ms per tile, "
                f"{100.0 * overhead / max(row.served.latency.mean_ms, 1e-9):.0f}% of the TorchServe time."
            )
    return out


def render(args: argparse.Namespace, result: Run) -> str:
    info = result.info
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (
        ("" if omp is None else f"OMP_NUM_THREADS={omp} ")
        + f".venv/bin/python bench/{NAME}.py --tiles {args.tiles} --size {args.size} --rounds {args.rounds}"
        + (" --skip-torchserve" if args.skip_torchserve else "")
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "| model | params | weights MB | in-process forward ms | in-process predict ms | TorchServe ms "
        "| TorchServe handler ms | in-process peak RSS MB | TorchServe worker peak RSS MB |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    lines = []
    for row in result.rows:
        srv = row.served
        lines.append(
            f"| {row.spec.label} | {row.params / 1e6:.2f} M | {row.weights_mib:.1f} "
            f"| {_ms(_forward(row))} | {_ms(_predict(row))} "
            f"| {_ms(srv.latency if srv else None)} | {_ms(srv.handler if srv else None)} "
            f"| {_rss(row.cpu)} | {'n/a' if srv is None else f'{srv.worker_hwm_mib:.0f}'} |"
        )
    table = header + "\n" + "\n".join(lines)

    if any(row.cuda for row in result.rows):
        gpu_rows = [
            f"| {row.spec.label} | {_ms(row.cuda.forward)} | {_ms(row.cuda.predict)} | "
            f"{(row.cuda.cuda_peak_mib or 0.0):.0f} |"
            for row in result.rows
            if row.cuda
        ]
        gpu = (
            f"{result.gpu}. In-process on cuda (TorchServe stays on the CPU):\n\n"
            "| model | forward ms | predict ms | cuda max_memory_allocated MB |\n|---|--:|--:|--:|\n"
            + "\n".join(gpu_rows)
        )
    else:
        gpu = f"GPU: {result.gpu}."

    threads = sorted({str(row.cpu.threads) for row in result.rows if row.cpu})
    worker_omp = sorted({row.served.worker_omp for row in result.rows if row.served})
    problems = [f"- {row.spec.key}: {e}" for row in result.rows for e in row.errors]
    if result.torchserve_error:
        problems.insert(0, f"- {result.torchserve_error}")
    problem_text = ("\n\nProblems in this run:\n\n" + "\n".join(problems)) if problems else ""
    note_text = "\n".join(f"- {n}" for n in notes(result))
    ts_start = f" TorchServe start {result.torchserve_start_s:.0f} s." if result.torchserve_start_s else ""

    return f"""## Model serving: FLAIR baseline vs small U-Net, in-process vs TorchServe

Command: `{command}` ({when}, {result.seconds / 60:.1f} min).{ts_start}

Machine: {info["nproc"]} CPU(s), {info["cpu"]}; Python {info["python"]}, torch {info["torch"]}, \
TorchServe {info["torchserve"]}. Intra-op threads: {", ".join(threads) or "?"} in the in-process children, \
OMP_NUM_THREADS={", ".join(worker_omp) or "?"} in the TorchServe worker. Load average before / after: \
{result.load_before} / {result.load_after} (a shared machine: compare rows of one run, not runs of different days).

{args.tiles} synthetic {args.size} x {args.size} tiles (5 bands, uint8), {args.rounds} round(s), one tile per \
call, sequential, after {WARMUP} warm-up calls. Random weights: latency and memory do not depend on the weight \
values. ms cells are p50 / mean per tile.

- in-process forward: bare `model(x)` under `torch.no_grad`; in-process predict: `InProcessPredictor.predict` \
(forward + drift features + class map), both in a child process per model;
- TorchServe: `TorchServePredictor.predict` (GeoTIFF encode, HTTP, handler, JSON decode); handler: the \
handler's own compute (`latency_ms` of its answer). 1 worker, batchSize 1, token auth on, on the CPU \
(`CUDA_VISIBLE_DEVICES=""`); the models are registered one after the other;
- in-process peak RSS: `VmHWM` of the child process that imports the project, loads that one model and \
predicts; in brackets the growth while predicting (peak after a high-water-mark reset once the model was \
loaded, minus the RSS then). `ru_maxrss` is not used: Linux carries the parent's peak into a child's \
`ru_maxrss` across `execve`;
- TorchServe worker peak RSS: `VmHWM` of the model's worker process (`model_service_worker`) after the timed \
calls. Both peaks include the Python + torch runtime. MB = MiB (2^20 bytes).

{table}

{gpu}

What the numbers show:

{note_text}{problem_text}
"""
