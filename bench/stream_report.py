"""Types, targets and the docs/benchmarks.md section of ``bench/stream.py`` (what was measured, and how it reads)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import Stats  # noqa: E402

NAME = "stream"
BATCHES = (1, 2, 4, 8)

#: the issue's targets
WORKER_VS_FORWARD = 0.8  # stream worker tiles/s >= 0.8 x bare forward at its best batch
PREDICT_VS_FORWARD = 0.85  # predictor with features at the best batch >= 0.85 x bare forward at the best batch
P99_VS_INFERENCE = 2.0  # p99 acquisition -> prediction latency at 50% load <= 2 x single-tile inference
FLAT_TOLERANCE = 0.02  # per-region stored state: "flat" = within 2% between the last two checkpoints


@dataclass(frozen=True)
class ModelSpec:
    key: str  # terradapt.architectures.resolve_arch spec
    label: str


MODELS = (
    ModelSpec("small", "small U-Net (UNetConfig defaults: base 16, depth 3)"),
    ModelSpec("flair-baseline", "flair-baseline (smp Unet + resnet34)"),
)


@dataclass
class InProcessRow:
    """Bare forward, predictor and embedded runner of one model at one tile size."""

    model: str
    size: int
    forward_tps: dict[int, float]  # batch -> tiles/s
    forward_b1: Stats  # per call, batch 1
    predict_single: Stats  # per call, one tile per call
    predict_single_tps: float
    predict_best_tps: float
    embedded_tps: float
    embedded_tiles: int
    embedded_regions: int
    embedded_drift_events: int = 0
    embedded_jobs: int = 0
    embedded_dead_letters: int = 0

    @property
    def best_batch(self) -> int:
        return max(self.forward_tps, key=lambda b: self.forward_tps[b])

    @property
    def forward_best_tps(self) -> float:
        return self.forward_tps[self.best_batch]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InProcessRow:
        return cls(
            **{
                **d,
                "forward_tps": {int(k): float(v) for k, v in d["forward_tps"].items()},
                "forward_b1": Stats(**d["forward_b1"]),
                "predict_single": Stats(**d["predict_single"]),
            }
        )


@dataclass
class KafkaRun:
    """N acquisitions published as fast as possible; first publish -> last prediction on the predictions topic."""

    workers: int
    tiles: int
    seconds: float
    processed: dict[str, int] = field(default_factory=dict)  # worker -> acquisitions it logged as processed

    @property
    def tps(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


@dataclass
class LatencyRun:
    """Acquisitions published at a fixed rate; published -> its prediction record seen on the predictions topic."""

    rate: float  # tiles/s offered
    tiles: int
    latency: Stats
    max_ms: float


@dataclass
class KafkaRow:
    model: str
    size: int
    variant: str
    one: KafkaRun | None = None
    two: KafkaRun | None = None
    latency: LatencyRun | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class MemoryPoint:
    tiles: int
    regions_seen: int
    total_bytes: int
    mean_bytes: float
    max_bytes: int
    rss_mib: float
    hwm_mib: float


@dataclass
class MemoryResult:
    """Pipeline.process over a long stream of many regions, state kept as the embedded runner keeps it."""

    regions: int
    tiles: int
    tile_px: int
    rss_setup_mib: float  # VmRSS once set up (the high-water mark is reset then)
    hwm_reset: bool
    points: list[MemoryPoint]
    per_tile_ms: float
    drift_events: int
    jobs: int
    dead_letters: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryResult:
        return cls(**{**d, "points": [MemoryPoint(**p) for p in d["points"]]})


@dataclass
class Run:
    info: dict[str, str]
    gpu: str
    threads: int
    load_before: str
    command: str
    load_after: str = ""
    seconds: float = 0.0
    in_process: list[InProcessRow] = field(default_factory=list)
    kafka: list[KafkaRow] = field(default_factory=list)
    memory: MemoryResult | None = None
    variants: list[str] = field(default_factory=list)
    worker_setup: str = ""  # partitions, regions, services
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # models / parts not measured, with the reason


# -- verdicts ------------------------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**MISSED**")


def flat(memory: MemoryResult) -> tuple[float, bool] | None:
    """Change of the mean per-region stored state between the last two checkpoints, and whether it is flat."""
    if len(memory.points) < 2 or memory.points[-2].mean_bytes <= 0:
        return None
    a, b = memory.points[-2].mean_bytes, memory.points[-1].mean_bytes
    change = b / a - 1.0
    return change, abs(change) <= FLAT_TOLERANCE


def _in_process(run: Run, model: str, size: int) -> InProcessRow | None:
    return next((r for r in run.in_process if r.model == model and r.size == size), None)


def _tps(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _label(key: str) -> str:
    return next((m.label for m in MODELS if m.key == key), key)


# -- the section --------------------------------------------------------------------------------------------------
def in_process_table(run: Run) -> str:
    head = (
        "| model | tile px | forward b=1 | forward best (batch) | predict, 1 tile/call | predict, best batch "
        f"| predict / forward (target >= {PREDICT_VS_FORWARD}) | embedded runner (/ forward best) "
        "| ms per call, b=1: forward / predict |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    lines = []
    for r in run.in_process:
        ratio = r.predict_best_tps / r.forward_best_tps if r.forward_best_tps > 0 else 0.0
        emb = r.embedded_tps / r.forward_best_tps if r.forward_best_tps > 0 else 0.0
        lines.append(
            f"| {r.model} | {r.size} | {_tps(r.forward_tps[1])} | {_tps(r.forward_best_tps)} ({r.best_batch}) "
            f"| {_tps(r.predict_single_tps)} | {_tps(r.predict_best_tps)} "
            f"| {ratio:.2f} {verdict(ratio >= PREDICT_VS_FORWARD)} | {_tps(r.embedded_tps)} ({emb:.2f}) "
            f"| {r.forward_b1.mean_ms:.0f} / {r.predict_single.mean_ms:.0f} |"
        )
    return head + "\n" + "\n".join(lines)


def kafka_table(run: Run) -> str:
    head = (
        "| model | tile px | worker settings | tiles | 1 worker | 2 workers | 1 worker / forward best "
        f"(target >= {WORKER_VS_FORWARD}) | 2 workers / forward best | latency at 50% load: rate, tiles "
        f"| p50 / p99 ms | p99 / single-tile predict (target <= {P99_VS_INFERENCE:g}) |\n"
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    lines = []
    for k in run.kafka:
        ip = _in_process(run, k.model, k.size)
        fwd = ip.forward_best_tps if ip else 0.0
        one = f"{_tps(k.one.tps)}" if k.one else "n/a"
        two = f"{_tps(k.two.tps)}" if k.two else "n/a"
        r1 = f"{k.one.tps / fwd:.2f} {verdict(k.one.tps / fwd >= WORKER_VS_FORWARD)}" if k.one and fwd else "n/a"
        r2 = f"{k.two.tps / fwd:.2f}" if k.two and fwd else "n/a"
        tiles = k.one.tiles if k.one else (k.two.tiles if k.two else 0)
        if k.latency:
            lat = k.latency
            single = ip.predict_single.mean_ms if ip else 0.0
            rate = f"{lat.rate:.2f}/s, {lat.tiles}"
            ms = f"{lat.latency.p50_ms:.0f} / {lat.latency.p99_ms:.0f}"
            p99 = (
                f"{lat.latency.p99_ms / single:.2f} {verdict(lat.latency.p99_ms / single <= P99_VS_INFERENCE)}"
                if single
                else "n/a"
            )
        else:
            rate, ms, p99 = "n/a", "n/a", "n/a"
        lines.append(
            f"| {k.model} | {k.size} | {k.variant} | {tiles or 'n/a'} | {one} | {two} | {r1} | {r2} "
            f"| {rate} | {ms} | {p99} |"
        )
    return head + "\n" + "\n".join(lines)


def memory_table(m: MemoryResult) -> str:
    head = (
        "| tiles processed | regions seen | stored state, all regions (bytes) | per region mean / max (bytes) "
        "| VmRSS growth MiB | VmHWM growth MiB |\n|--:|--:|--:|--:|--:|--:|"
    )
    lines = [
        f"| {p.tiles:,} | {p.regions_seen} | {p.total_bytes:,} | {p.mean_bytes:,.0f} / {p.max_bytes:,} "
        f"| {p.rss_mib - m.rss_setup_mib:+.1f} | {p.hwm_mib - m.rss_setup_mib:+.1f} |"
        for p in m.points
    ]
    return head + "\n" + "\n".join(lines)


def targets(run: Run) -> list[str]:
    """One line per target and configuration, from the tables (MISSED where missed)."""
    out: list[str] = []
    for r in run.in_process:
        ratio = r.predict_best_tps / r.forward_best_tps if r.forward_best_tps > 0 else 0.0
        out.append(
            f"predictor with features >= {PREDICT_VS_FORWARD}x bare forward (batch {r.best_batch}), {r.model} "
            f"{r.size} px: {ratio:.2f}x, {verdict(ratio >= PREDICT_VS_FORWARD)}"
        )
    for k in run.kafka:
        ip = _in_process(run, k.model, k.size)
        if ip is None:
            continue
        where = f"{k.model} {k.size} px, worker {k.variant}"
        if k.one:
            ratio = k.one.tps / ip.forward_best_tps
            out.append(
                f"stream worker >= {WORKER_VS_FORWARD}x bare forward (batch {ip.best_batch}), {where}: "
                f"{ratio:.2f}x ({_tps(k.one.tps)} vs {_tps(ip.forward_best_tps)} tiles/s), "
                f"{verdict(ratio >= WORKER_VS_FORWARD)}"
            )
        else:
            out.append(f"stream worker >= {WORKER_VS_FORWARD}x bare forward, {where}: not measured, **MISSED**")
        if k.latency:
            single = ip.predict_single.mean_ms
            ratio = k.latency.latency.p99_ms / single
            out.append(
                f"p99 latency <= {P99_VS_INFERENCE:g}x single-tile inference at 50% load, {where}: p99 "
                f"{k.latency.latency.p99_ms:.0f} ms = {ratio:.2f}x the {single:.0f} ms of one predict call "
                f"({k.latency.latency.p99_ms / ip.forward_b1.mean_ms:.2f}x the bare forward's "
                f"{ip.forward_b1.mean_ms:.0f} ms), {verdict(ratio <= P99_VS_INFERENCE)}"
            )
    if run.memory is not None:
        fl = flat(run.memory)
        if fl is not None:
            a, b = run.memory.points[-2], run.memory.points[-1]
            out.append(
                f"monitor memory flat in stream length: per-region stored state {a.mean_bytes:,.0f} bytes at "
                f"{a.tiles:,} tiles, {b.mean_bytes:,.0f} at {b.tiles:,} ({100 * fl[0]:+.1f}%; flat = within "
                f"{100 * FLAT_TOLERANCE:.0f}%), {verdict(fl[1])}"
            )
    return out


def notes(run: Run) -> list[str]:
    """Ratios between rows of this run (computed, never written by hand)."""
    out: list[str] = []
    for r in run.in_process:
        fwd1 = r.forward_tps[1]
        out.append(
            f"{r.model} {r.size} px: batching the bare forward gives {r.forward_best_tps / fwd1:.2f}x batch 1 "
            f"(best batch {r.best_batch}); the predictor's features and class map cost "
            f"{r.predict_single.mean_ms - r.forward_b1.mean_ms:.0f} ms per single-tile call; the embedded runner "
            f"reaches {r.embedded_tps / r.predict_best_tps:.2f}x the predictor at the best batch "
            f"(drift events {r.embedded_drift_events}, adaptation jobs {r.embedded_jobs}, dead letters "
            f"{r.embedded_dead_letters} over {r.embedded_tiles} tiles)."
        )
    by_key = {(k.model, k.size, k.variant): k for k in run.kafka}
    for k in run.kafka:
        if k.one and k.two:
            share = ", ".join(f"{w} {n}" for w, n in sorted(k.two.processed.items()))
            out.append(
                f"{k.model} {k.size} px, worker {k.variant}: 2 workers / 1 worker {k.two.tps / k.one.tps:.2f}x "
                f"(tiles processed per worker: {share})."
            )
    if len(run.variants) > 1:
        default, single = run.variants[0], run.variants[1]
        for (model, size, variant), k in by_key.items():
            other = by_key.get((model, size, single))
            if variant != default or other is None:
                continue
            if k.one and other.one:
                out.append(
                    f"{model} {size} px, 1 worker: {default} / {single} = {k.one.tps / other.one.tps:.2f}x tiles/s"
                    + (
                        f"; p99 latency at the same offered rate {k.latency.latency.p99_ms:.0f} vs "
                        f"{other.latency.latency.p99_ms:.0f} ms."
                        if k.latency and other.latency
                        else "."
                    )
                )
    return out


def render(run: Run) -> str:
    info = run.info
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    variants = "; ".join(run.variants) or "n/a"
    memory = ""
    if run.memory is not None:
        m = run.memory
        hwm = "reset" if m.hwm_reset else "NOT reset (clear_refs failed)"
        memory = f"""### Monitor and stored state: {m.regions} regions, {m.tiles:,} tiles

`Pipeline.process` of the default settings with a stand-in predictor that returns the small U-Net's real \
outputs (features of {m.tile_px} px synthetic source tiles, precomputed), so that the stream is long and cheap; \
every other stage runs (STAC parsing, object read and raster checks, monitor update, trigger, state restore and \
serialisation). Regions in round-robin; each region's state bytes kept in a dict, as the embedded runner keeps \
them (the faust table stores the same bytes). {m.per_tile_ms:.2f} ms per tile outside the model. Drift events \
{m.drift_events}, adaptation jobs {m.jobs}, dead letters {m.dead_letters}. RSS growth: from `VmRSS` once set up \
({m.rss_setup_mib:.0f} MiB; the high-water mark was {hwm} then), in a child process (not `ru_maxrss`: Linux \
carries the parent's peak into a child's `ru_maxrss` across `execve`).

{memory_table(m)}
"""
    problems = "".join(f"\n- {p}" for p in run.problems)
    problem_text = f"\n\nProblems in this run:\n{problems}" if problems else ""
    skipped = "".join(f"\n- {s}" for s in run.skipped)
    skipped_text = f"\n\nNot measured:\n{skipped}" if skipped else ""
    target_text = "\n".join(f"- {t}" for t in targets(run))
    note_text = "\n".join(f"- {n}" for n in notes(run))
    models = "; ".join(f"`{m.key}` = {m.label}" for m in MODELS if any(r.model == m.key for r in run.in_process))

    return f"""## Stream path throughput: bare forward, predictor, embedded runner, Kafka workers, monitor memory

Command: `{run.command}` ({when}, {run.seconds / 60:.1f} min)

Machine: {info["nproc"]} CPU(s), {info["cpu"]}; Python {info["python"]}, torch {info["torch"]}; {run.gpu}. \
Intra-op threads: {run.threads} (`torch.set_num_threads` here, `OMP_NUM_THREADS={run.threads}` in every worker \
process). The in-process rows and the memory run come first, before Kafka + MinIO start; the worker rows share \
the machine with Kafka, MinIO and this process (publishing, reading the topics). Load average before / after: \
{run.load_before} / {run.load_after} (a shared machine: compare rows of one run, not runs of different days).

Models (random weights, seed 0: speed does not depend on the weight values): {models}. Synthetic 5-band \
uint8 tiles of source-like departement D033 (calibration and timed tiles drawn from different seeds). tiles/s \
cells are throughput on the CPU (`runtime.device=cpu`).

- forward: bare `model(x)` under `torch.no_grad`, batches of {", ".join(map(str, BATCHES))}; the best batch is \
the one with the most tiles/s;
- predict: `InProcessPredictor.predict` (forward + drift features + class map), one tile per call, and calls of \
the forward's best batch with `batch_size` set to it;
- embedded runner: `EmbeddedRunner` over the default settings (prediction COGs written to a local folder, \
monitor, trigger), tiles in round-robin over {run.in_process[0].embedded_regions if run.in_process else 0} \
regions, after one warm-up tile per region;
- Kafka: `terradapt worker` processes on a Kafka + MinIO started by this benchmark (deploy/local/services.sh, \
own loopback ports and run folder, stopped at the end). {run.worker_setup} Tiles are uploaded to MinIO \
beforehand; the acquisitions (STAC items, keyed by region) are published as fast as possible; tiles/s = tiles / \
(first publish -> last prediction record read back from the predictions topic). One warm-up tile per region \
first (model load, monitor calibration). 2 workers: one consumer group, two partitions each. Worker settings: \
{variants};
- latency at 50% load: acquisitions published at a fixed rate of half the 1-worker capacity of the default \
settings (1 worker); latency = prediction record seen on the predictions topic (a consumer polling with \
`fetch_max_wait_ms=10`) - just before the acquisition was sent. "single-tile predict" = mean of one \
`InProcessPredictor.predict` call of one tile (the stream's inference: forward + features + class map).

### In-process, tiles/s

{in_process_table(run)}

### Kafka stream workers, end to end (tiles/s; latency ms)

{kafka_table(run) if run.kafka else "Not measured (see below)."}

{memory}
### Targets

{target_text}

### What the numbers show

{note_text}{skipped_text}{problem_text}
"""
