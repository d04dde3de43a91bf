"""Throughput limit of the stream path, side by side: bare forward, predictor, embedded runner, Kafka workers, memory.

    .venv/bin/python bench/stream.py [--models small,flair-baseline] [--sizes 256,512] [--threads 1] [--quick]

In one run, for each model (the small U-Net of ``UNetConfig()``'s defaults, and the flair-baseline-sized smp
Unet + resnet34 when segmentation-models-pytorch imports) and each tile size:

* bare forward ``model(x)`` under ``torch.no_grad`` at batch 1, 2, 4 and 8 (tiles/s; the best batch is kept);
* ``InProcessPredictor.predict`` (forward + drift features + class map), one tile per call and calls of the best
  batch; its ratio to the bare forward at the best batch;
* the embedded runner (``stream.build.embedded_runner``, default settings) over synthetic tiles of 4 regions;
* the Kafka stream worker end to end: ``terradapt worker`` processes (1, then 2 in one consumer group) on a Kafka +
  MinIO this benchmark starts on its own free loopback ports (``bench/stream_kafka.py``); N acquisitions whose
  objects were uploaded beforehand, published as fast as possible; tiles/s from the first publish to the last
  prediction record read back; then p50/p99 acquisition -> prediction latency at half the measured 1-worker
  capacity. With the default worker settings, and with ``stream.batch_max_tiles=1`` too when that setting exists;
* in a child process: ``Pipeline.process`` over 10,000 tiles of 100 regions (the model's outputs precomputed),
  the stored state per region at 1,000 / 5,000 / 10,000 tiles and the process's RSS growth (``VmHWM``).

Torch threads are set deliberately (``--threads``, default 1): ``torch.set_num_threads`` here, ``OMP_NUM_THREADS`` in
every worker process. Rewrites the "bench/stream.py" section of docs/benchmarks.md (``--quick`` only prints).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import stream_kafka as kafka  # noqa: E402
from bench.doc_section import DOC, write_section  # noqa: E402
from bench.model_serving import reset_hwm, self_mib  # noqa: E402
from bench.serving import Stats, load_average, machine  # noqa: E402
from bench.stream_report import (  # noqa: E402
    BATCHES,
    MODELS,
    NAME,
    InProcessRow,
    KafkaRow,
    MemoryPoint,
    MemoryResult,
    ModelSpec,
    Run,
    render,
)
from monitoring.calibration import CalibrationData  # noqa: E402
from serving.predictor import InProcessPredictor, TileOutput  # noqa: E402
from serving.registry import ModelRegistry  # noqa: E402
from serving.rollout import InProcessDeployer  # noqa: E402
from serving.store import FileSystemStore, MemoryReader, MemoryStore  # noqa: E402
from stream.build import build_pipeline, embedded_runner  # noqa: E402
from stream.config import Settings  # noqa: E402
from stream.embedded import StreamItem  # noqa: E402
from stream.scenarios import stream_item  # noqa: E402
from terradapt.architectures import model_from_config, resolve_arch  # noqa: E402
from terradapt.checkpoint import ModelManifest, encode  # noqa: E402
from terradapt.classes import FLAIR_BANDS, FLAIR_CLASSES  # noqa: E402
from terradapt.datasets.base import Sample  # noqa: E402
from terradapt.datasets.synthetic import SyntheticDataset  # noqa: E402
from terradapt.model import SegmentationModel  # noqa: E402
from terradapt.settings import RuntimeConfig  # noqa: E402

TILE_REGION = "D033"  # the synthetic source departement every tile is drawn from
CALIBRATION_TILES = 16  # two monitor windows (the least a calibration accepts); also the predictor's timed tiles
FORWARD_TILES = 8  # tiles of the forward sweep (one call of the largest batch)
POOL_TILES = 64  # distinct stream tiles per size (a region never gets the same tile twice in a run)
EMBEDDED_REGIONS = 4
MEMORY_PX = 64


@dataclass(frozen=True)
class Mode:
    """How long each measurement runs."""

    min_seconds: float  # each forward / predict measurement runs at least this long
    embedded_seconds: float  # embedded runner stream, at the predictor's speed
    kafka_seconds: float  # each throughput run, at the predictor's speed
    latency_seconds: float  # the latency run, at the offered rate
    memory_tiles: int
    memory_regions: int


FULL = Mode(min_seconds=3.0, embedded_seconds=10.0, kafka_seconds=12.0, latency_seconds=30.0, memory_tiles=10_000,
            memory_regions=100)  # fmt: skip
QUICK = Mode(min_seconds=0.3, embedded_seconds=1.0, kafka_seconds=1.0, latency_seconds=2.0, memory_tiles=300,
             memory_regions=10)  # fmt: skip


# -- models and tiles ---------------------------------------------------------------------------------------------
@dataclass
class Built:
    spec: ModelSpec
    model: SegmentationModel
    weights: bytes
    manifest: ModelManifest
    features: dict[int, list[TileOutput]]  # size -> calibration outputs of the source model


def build_model(spec: ModelSpec) -> Built:
    """Random weights (seed 0), as ``bench/model_serving.py`` builds them; the manifest as the registry stores it."""
    torch.manual_seed(0)
    arch = resolve_arch(spec.key, in_channels=len(FLAIR_BANDS), num_classes=len(FLAIR_CLASSES))
    model = model_from_config(arch.config)
    if arch.normalisation is not None:
        model.set_normalisation(*arch.normalisation)
    weights, manifest_json = encode(
        model, ModelManifest(config=arch.config.to_dict(), classes=FLAIR_CLASSES, bands=FLAIR_BANDS)
    )
    return Built(spec, model.eval(), weights, ModelManifest.model_validate_json(manifest_json), {})


def samples(n: int, size: int, seed: int) -> list[Sample]:
    data = SyntheticDataset({TILE_REGION: n}, size=size, seed=seed)
    return [data.load(TILE_REGION, t) for t in data.tile_ids(TILE_REGION)]


def publish(registry: ModelRegistry, built: Built, outputs: Sequence[TileOutput]) -> None:
    """Source model + calibration data made of its own outputs on held-out source tiles (as registry-init does)."""
    version = registry.publish_source(built.weights, built.manifest)
    registry.publish_calibration(
        CalibrationData.from_features([o.features for o in outputs], seed=0, model_sha256=version.sha256)
    )


# -- in-process -----------------------------------------------------------------------------------------------------
def timed_calls(fn: Callable[[], object], calls: int, min_seconds: float) -> list[float]:
    """Seconds of each call: at least ``calls`` calls, and more until ``min_seconds`` have passed."""
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bare_forward(model: SegmentationModel, batches: list[torch.Tensor]) -> Callable[[], None]:
    """One call = ``model(x)`` under ``torch.no_grad`` on the next batch (in turn)."""
    it = itertools.cycle(batches)

    def forward() -> None:
        with torch.no_grad():
            model(next(it))

    return forward


def forward_sweep(
    model: SegmentationModel, images: npt.NDArray[np.uint8], mode: Mode
) -> tuple[dict[int, float], Stats]:
    """Tiles/s of the bare forward at each batch; the per-call times at batch 1."""
    tps: dict[int, float] = {}
    b1 = Stats(0.0, 0.0, 0.0)
    for b in BATCHES:
        batches = [torch.from_numpy(images[i : i + b]).float() for i in range(0, len(images) - b + 1, b)]
        forward = bare_forward(model, batches)
        forward()  # warm-up: this shape's primitives
        seconds = timed_calls(forward, len(batches), mode.min_seconds)
        tps[b] = b * len(seconds) / sum(seconds)
        if b == 1:
            b1 = Stats.of(seconds)
    return tps, b1


def predict_calls(
    predictor: InProcessPredictor, images: list[npt.NDArray[np.uint8]], b: int, mode: Mode
) -> tuple[list[float], list[TileOutput]]:
    """Per-call seconds of ``predict`` with ``b`` tiles per call; the outputs of the first pass over the tiles."""
    chunks = [images[i : i + b] for i in range(0, len(images) - b + 1, b)]
    predictor.predict(TILE_REGION, chunks[0])  # warm-up
    first: list[TileOutput] = []
    it = itertools.cycle(chunks)

    def call() -> None:
        outs = predictor.predict(TILE_REGION, next(it))
        if len(first) < len(images):
            first.extend(outs)

    return timed_calls(call, len(chunks), mode.min_seconds), first


def measure_embedded(
    registry: ModelRegistry, pool: list[StreamItem], n: int, work: Path
) -> tuple[float, int, int, int]:
    """Tiles/s of the embedded runner over ``n`` tiles (after one per region); drift events, jobs, dead letters."""
    settings = Settings(runtime=RuntimeConfig(device="cpu"))
    predictions = FileSystemStore(work)
    runner = embedded_runner(settings, registry, predictions, label_delay=0)
    regions = [f"emb-{i}" for i in range(EMBEDDED_REGIONS)]
    per_region = [pool[i::EMBEDDED_REGIONS] for i in range(EMBEDDED_REGIONS)]

    def item(k: int) -> StreamItem:  # the k-th acquisition: region k % R, that region's (k // R)-th tile
        base = per_region[k % EMBEDDED_REGIONS][k // EMBEDDED_REGIONS]
        region = regions[k % EMBEDDED_REGIONS]
        acq = base.acquisition.model_copy(update={"region": region, "id": f"{region}-{k:05d}"})
        return StreamItem(acq, base.data)

    for k in range(EMBEDDED_REGIONS):  # warm-up: model load, monitor calibration, each region's first state
        runner.step(item(k))
    before = len(runner.result.predictions)
    items = [item(EMBEDDED_REGIONS + k) for k in range(n)]
    t0 = time.perf_counter()
    result = runner.run(items)
    seconds = time.perf_counter() - t0
    done = len(result.predictions) - before
    if done != n:
        reasons = "; ".join(d.reason for d in result.dead_letters[:3])
        raise RuntimeError(f"embedded runner: {done} predictions of {n} tiles ({reasons})")
    return n / seconds, len(result.drift_events), len(result.adaptations), len(result.dead_letters)


def measure_in_process(
    built: Built,
    size: int,
    calibration: list[Sample],
    pool: list[StreamItem],
    mode: Mode,
    work: Path,
) -> InProcessRow:
    images = [s.image for s in calibration]
    forward_tps, b1 = forward_sweep(built.model, np.stack(images[:FORWARD_TILES]), mode)
    best = max(forward_tps, key=lambda b: forward_tps[b])

    registry = ModelRegistry(MemoryStore("models"))
    registry.publish_source(built.weights, built.manifest)
    window = max(512, size)
    single = InProcessPredictor(registry, device="cpu", window=window, batch_size=1)
    single_s, outputs = predict_calls(single, images, 1, mode)
    batched = InProcessPredictor(registry, device="cpu", window=window, batch_size=best)
    best_s, _ = predict_calls(batched, images, best, mode)
    built.features[size] = outputs
    predict_single_tps = len(single_s) / sum(single_s)
    predict_best_tps = best * len(best_s) / sum(best_s)

    registry = ModelRegistry(MemoryStore("models"))
    publish(registry, built, outputs)
    n = kafka.tiles_for(mode.embedded_seconds, predict_best_tps, len(pool) // EMBEDDED_REGIONS, EMBEDDED_REGIONS)
    emb_tps, drift, jobs, dead = measure_embedded(registry, pool, n, work / f"predictions-{built.spec.key}")
    return InProcessRow(
        model=built.spec.key,
        size=size,
        forward_tps=forward_tps,
        forward_b1=b1,
        predict_single=Stats.of(single_s),
        predict_single_tps=predict_single_tps,
        predict_best_tps=predict_best_tps,
        embedded_tps=emb_tps,
        embedded_tiles=n,
        embedded_regions=EMBEDDED_REGIONS,
        embedded_drift_events=drift,
        embedded_jobs=jobs,
        embedded_dead_letters=dead,
    )


# -- monitor + stored state memory (child process) -----------------------------------------------------------------
class PrecomputedPredictor:
    """Returns real outputs of the model, computed beforehand, in turn: the stream is long, the model is not run."""

    def __init__(self, outputs: list[TileOutput]) -> None:
        self._outputs = itertools.cycle(outputs)

    def predict(
        self, region: str, images: Sequence[npt.NDArray[np.uint8]], version: int | None = None
    ) -> list[TileOutput]:
        return [next(self._outputs) for _ in images]


def measure_memory(regions: int, tiles: int, checkpoints: list[int]) -> MemoryResult:
    built = build_model(MODELS[0])
    rng = np.random.default_rng(0)
    calibration = samples(CALIBRATION_TILES, MEMORY_PX, seed=0)
    registry = ModelRegistry(MemoryStore("models"))
    predictor = InProcessPredictor(registry, device="cpu", batch_size=4)
    registry.publish_source(built.weights, built.manifest)
    publish(registry, built, predictor.predict(TILE_REGION, [s.image for s in calibration]))
    stream = samples(POOL_TILES, MEMORY_PX, seed=1)
    outputs = predictor.predict(TILE_REGION, [s.image for s in stream])
    outputs = [outputs[i] for i in rng.permutation(len(outputs))]
    objects = MemoryStore("acquisitions")
    item = stream_item("pool-0", 0, stream[0], FLAIR_BANDS)
    href = objects.put("pool/0.tif", item.data, "image/tiff")
    settings = Settings(runtime=RuntimeConfig(device="cpu"))
    pipeline = build_pipeline(
        settings,
        registry=registry,
        reader=MemoryReader(objects),
        predictions=None,
        predictor=PrecomputedPredictor(outputs),
        deployer=InProcessDeployer(registry),
    )
    names = [f"region-{i}" for i in range(regions)]

    def payload(k: int) -> tuple[bytes, str]:
        region = names[k % regions]
        acq = item.acquisition.model_copy(update={"region": region, "id": f"{region}-{k:06d}", "href": href})
        return acq.to_json(), region

    warm = pipeline.process(*payload(0), None)  # the monitor template (calibration) is built once, here
    if warm.state is None:
        raise RuntimeError(f"warm-up tile dead-lettered: {warm.messages}")
    states: dict[str, bytes] = {}
    drift = jobs = dead = 0
    reset = reset_hwm()
    rss_setup = self_mib("VmRSS")
    points: list[MemoryPoint] = []
    t0 = time.perf_counter()
    for k in range(tiles):
        body, region = payload(k)
        outcome = pipeline.process(body, region, states.get(region))
        if outcome.state is not None:
            states[region] = outcome.state
        for m in outcome.messages:
            drift += m.topic == "drift_events"
            jobs += m.topic == "adaptation_jobs"
            dead += m.topic == "deadletter"
        if k + 1 in checkpoints:
            sizes = [len(s) for s in states.values()]
            points.append(
                MemoryPoint(
                    tiles=k + 1,
                    regions_seen=len(states),
                    total_bytes=sum(sizes),
                    mean_bytes=float(np.mean(sizes)),
                    max_bytes=max(sizes),
                    rss_mib=self_mib("VmRSS"),
                    hwm_mib=self_mib("VmHWM"),
                )
            )
    per_tile_ms = 1000.0 * (time.perf_counter() - t0) / tiles
    return MemoryResult(regions, tiles, MEMORY_PX, rss_setup, reset, points, per_tile_ms, drift, jobs, dead)


def run_memory_child(mode: Mode, threads: int) -> MemoryResult:
    tiles = mode.memory_tiles
    job = {"regions": mode.memory_regions, "tiles": tiles, "checkpoints": [tiles // 10, tiles // 2, tiles]}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"memory child exit {proc.returncode}:\n{tail}")
    return MemoryResult.from_dict(json.loads(lines[-1].removeprefix("RESULT ")))


# -- Kafka ----------------------------------------------------------------------------------------------------------
def run_kafka(
    result: Run, models: list[Built], sizes: list[int], pools: dict[int, list[StreamItem]], mode: Mode, work: Path
) -> None:
    variants = kafka.variants()
    result.variants = [v.label for v in variants]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with kafka.services(work / "services") as (svc, client_env):
        print(f"Kafka + MinIO up in {time.perf_counter() - t0:.0f} s ({svc.ports})", flush=True)
        result.worker_setup = (
            f"Services on {svc.ports} (free loopback ports); {kafka.PARTITIONS} partitions, each run streams "
            f"{kafka.PARTITIONS} fresh regions (one per partition, in round-robin)."
        )
        dep = kafka.Deployment(client_env, result.threads, work / "logs")
        index = itertools.count()
        for built in models:
            registry, acquisitions = dep.stores(built.spec.key)
            publish(registry, built, [o for size in sizes for o in built.features.get(size, [])])
            stored = {size: kafka.upload_pool(acquisitions, size, [i.data for i in pools[size]]) for size in sizes}
            capacity: dict[int, float] = {}  # size -> 1-worker tiles/s with the default settings
            for variant in variants:
                rows = {size: KafkaRow(built.spec.key, size, variant.label) for size in sizes}
                result.kafka.extend(rows.values())
                try:
                    kafka_stack(dep, built, variant, next(index), sizes, stored, rows, capacity, result, mode)
                except Exception as exc:  # reported in the section; the next stack still runs
                    for row in rows.values():
                        row.errors.append(f"{type(exc).__name__}: {exc}")
                    result.problems.append(f"Kafka, {built.spec.key}, {variant.label}: {type(exc).__name__}: {exc}")
                    print(f"Kafka {built.spec.key} {variant.label}: FAILED {exc}", flush=True)


def kafka_stack(
    dep: kafka.Deployment,
    built: Built,
    variant: kafka.Variant,
    index: int,
    sizes: list[int],
    stored: dict[int, list[kafka.StoredTile]],
    rows: dict[int, KafkaRow],
    capacity: dict[int, float],
    result: Run,
    mode: Mode,
) -> None:
    """1 worker: throughput and latency per size; a second worker joins: throughput per size."""
    stack = dep.stack(built.spec.key, variant, index)
    expected = {r.size: r.predict_best_tps for r in result.in_process if r.model == built.spec.key}
    try:
        t0 = time.perf_counter()
        stack.start_worker("a")
        print(f"Kafka {built.spec.key} {variant.label}: worker a ready in {time.perf_counter() - t0:.0f} s")
        for size in sizes:
            n = kafka.tiles_for(mode.kafka_seconds, expected[size], len(stored[size]))
            timeout = 120.0 + 10.0 * n / expected[size]
            run = stack.throughput(dep.regions.fresh(), stored[size], n, timeout)
            rows[size].one = run
            capacity.setdefault(size, run.tps)
            print(f"  {size} px, 1 worker: {run.tiles} tiles in {run.seconds:.1f} s = {run.tps:.2f} tiles/s")
            rate = 0.5 * capacity[size]
            m = kafka.tiles_for(mode.latency_seconds, rate, len(stored[size]))
            lat = stack.latency(dep.regions.fresh(), stored[size], m, rate, timeout + m / rate)
            rows[size].latency = lat
            print(
                f"  {size} px, latency at {rate:.2f} tiles/s ({m} tiles): p50 {lat.latency.p50_ms:.0f} ms, "
                f"p99 {lat.latency.p99_ms:.0f} ms",
                flush=True,
            )
        t0 = time.perf_counter()
        stack.start_worker("b")
        print(f"Kafka {built.spec.key} {variant.label}: worker b ready in {time.perf_counter() - t0:.0f} s")
        for size in sizes:
            n = kafka.tiles_for(mode.kafka_seconds, 2 * expected[size], len(stored[size]))
            run = stack.throughput(dep.regions.fresh(), stored[size], n, 120.0 + 10.0 * n / expected[size])
            rows[size].two = run
            print(
                f"  {size} px, 2 workers: {run.tiles} tiles in {run.seconds:.1f} s = {run.tps:.2f} tiles/s "
                f"(processed per worker {run.processed})",
                flush=True,
            )
    finally:
        stack.close()


# -- the run ----------------------------------------------------------------------------------------------------------
def gpu_line() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)} present, not used (every row runs on the CPU)"
    return "no GPU (torch.cuda.is_available() is False)"


def smp_available() -> str | None:
    """None when segmentation-models-pytorch imports, else why not."""
    if importlib.util.find_spec("segmentation_models_pytorch") is None:
        return "segmentation-models-pytorch is not installed"
    return None


def run(args: argparse.Namespace, mode: Mode) -> Run:
    t_start = time.perf_counter()
    omp = os.environ.get("OMP_NUM_THREADS")  # as the command was given
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # children (memory child, workers) inherit it
    command = ("" if omp is None else f"OMP_NUM_THREADS={omp} ") + ".venv/bin/python bench/stream.py"
    result = Run(
        info=machine(),
        gpu=gpu_line(),
        threads=torch.get_num_threads(),
        load_before=load_average(),
        command=" ".join([command, *map(shlex.quote, sys.argv[1:])]),
    )
    specs = [m for m in MODELS if m.key in args.models]
    missing = smp_available()
    if missing and any(m.key == "flair-baseline" for m in specs):
        result.skipped.append(f"flair-baseline: {missing}")
        specs = [m for m in specs if m.key != "flair-baseline"]
    work = Path(tempfile.mkdtemp(prefix="terradapt-bench-stream-"))
    try:
        calibration = {size: samples(CALIBRATION_TILES, size, seed=0) for size in args.sizes}
        pools = {
            size: [stream_item("pool-0", i, s, FLAIR_BANDS) for i, s in enumerate(samples(POOL_TILES, size, seed=1))]
            for size in args.sizes
        }
        models: list[Built] = []
        for spec in specs:
            built = build_model(spec)
            models.append(built)
            for size in args.sizes:
                t0 = time.perf_counter()
                row = measure_in_process(built, size, calibration[size], pools[size], mode, work)
                result.in_process.append(row)
                print(
                    f"{spec.key} {size} px: forward b=1 {row.forward_tps[1]:.2f}, best {row.forward_best_tps:.2f} "
                    f"(batch {row.best_batch}); predict 1/call {row.predict_single_tps:.2f}, batch "
                    f"{row.best_batch} {row.predict_best_tps:.2f}; embedded {row.embedded_tps:.2f} tiles/s "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

        if args.skip_memory:
            result.skipped.append("monitor memory: skipped (--skip-memory)")
        else:
            t0 = time.perf_counter()
            try:
                result.memory = run_memory_child(mode, args.threads)
                print(f"memory: {result.memory.points[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result.problems.append(f"monitor memory: {exc}")
                print(f"memory: FAILED {exc}", flush=True)

        if args.skip_kafka:
            result.skipped.append("Kafka stream workers: skipped (--skip-kafka)")
        else:
            try:
                run_kafka(result, models, args.sizes, pools, mode, work)
            except Exception as exc:  # the services did not start (or stop): reported, the rest is kept
                result.problems.append(f"Kafka + MinIO: {type(exc).__name__}: {exc}")
                print(f"Kafka: FAILED {exc}", flush=True)
    finally:
        if args.keep:
            print(f"kept {work} (worker logs in logs/, services in services/)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result.load_after = load_average()
    result.seconds = time.perf_counter() - t_start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(m.key for m in MODELS), help="comma-separated: small,flair-baseline"
    )
    parser.add_argument("--sizes", default=None, help="tile sizes in px, comma-separated (default 256,512)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS of workers)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px unless --sizes, short runs, no write")
    parser.add_argument("--skip-kafka", action="store_true", help="no Kafka + MinIO, no worker rows")
    parser.add_argument("--skip-memory", action="store_true", help="no monitor memory measurement")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (worker logs, services)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        job = json.loads(args.memory_child)
        print("RESULT " + json.dumps(asdict(measure_memory(job["regions"], job["tiles"], job["checkpoints"]))))
        return
    if args.sizes is None:
        args.sizes = "64" if args.quick else "256,512"
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    args.models = [m.strip() for m in str(args.models).split(",") if m.strip()]
    unknown = sorted(set(args.models) - {m.key for m in MODELS})
    if unknown or args.threads < 1 or not args.sizes or min(args.sizes) < 32:
        parser.error(f"--models: {unknown or 'ok'} (accepted: {[m.key for m in MODELS]}); --threads >= 1; sizes >= 32")
    result = run(args, QUICK if args.quick else FULL)
    section = render(result)
    print(section)
    if not (args.no_write or args.quick):
        write_section(NAME, section)
        print(f"updated {DOC.relative_to(ROOT)}")
    if result.problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
