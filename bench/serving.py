"""Per-tile latency and throughput: TorchServe vs the in-process predictor, same model, same tiles, one run.

    .venv/bin/python bench/serving.py [--tiles 24] [--size 256] [--rounds 2] [--concurrency 2]

Starts its own TorchServe (deploy/torchserve/torchserve.sh, free loopback ports, temporary run dir), registers
the model through the TorchServe deployer, measures, stops TorchServe, and rewrites the "Serving" section of
docs/benchmarks.md (between its markers; other sections are left alone).

What is measured:
* latency: one tile per call, sequential, after warm-up. In-process = ``InProcessPredictor.predict``; TorchServe =
  ``TorchServePredictor.predict`` (GeoTIFF encode + HTTP + handler + JSON decode). The handler's own compute time
  (``latency_ms`` of its answer) is reported too, so the serving overhead is visible.
* throughput: all tiles at once. In-process = one ``predict`` call (batches of 4 same-shaped tiles); TorchServe =
  ``--concurrency`` client threads against the model's single worker (the deployed configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.doc_section import DOC, write_section  # noqa: E402
from serving.codec import decode_prediction  # noqa: E402
from serving.packaging import model_name  # noqa: E402
from serving.predictor import InProcessPredictor  # noqa: E402
from serving.registry import ModelRegistry  # noqa: E402
from serving.store import FileSystemStore  # noqa: E402
from serving.torchserve import TorchServeClient, TorchServeDeployer, TorchServePredictor, encode_tile  # noqa: E402
from terradapt.checkpoint import ModelManifest, encode  # noqa: E402
from terradapt.classes import FLAIR_BANDS, FLAIR_CLASSES  # noqa: E402
from terradapt.datasets.synthetic import SyntheticDataset  # noqa: E402
from terradapt.model import UNet, UNetConfig  # noqa: E402
from terradapt.settings import TorchServeConfig  # noqa: E402

SCRIPT = ROOT / "deploy" / "torchserve" / "torchserve.sh"
REGION = "D033"


@dataclass
class Stats:
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = np.asarray(seconds) * 1000.0
        return cls(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.mean()))


@dataclass
class Results:
    load_before: str = ""
    load_after: str = ""
    register_s: float = 0.0
    encode_ms: float = 0.0
    local_tps: float = 0.0
    served_tps: float = 0.0
    local_latency: Stats | None = None
    served_latency: Stats | None = None
    handler_latency: Stats | None = None


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    nproc = str(len(os.sched_getaffinity(0)))  # not `nproc`: it follows OMP_NUM_THREADS
    return {
        "nproc": nproc or str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "torchserve": _version("ts"),
    }


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchserve") if module == "ts" else version(module)
    except PackageNotFoundError:
        return "unknown"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def torchserve_settings(work: Path, timeout_s: float) -> tuple[dict[str, str], TorchServeConfig]:
    """Environment of deploy/torchserve/torchserve.sh (free loopback ports, run dir under ``work``) + client config."""
    ports = free_ports(3)
    env = {
        **os.environ,
        "TERRADAPT_RUN_DIR": str(work / "run"),
        "TERRADAPT_TS_INFERENCE_PORT": str(ports[0]),
        "TERRADAPT_TS_MANAGEMENT_PORT": str(ports[1]),
        "TERRADAPT_TS_METRICS_PORT": str(ports[2]),
    }
    config = TorchServeConfig(
        inference_url=f"http://127.0.0.1:{ports[0]}",
        management_url=f"http://127.0.0.1:{ports[1]}",
        metrics_url=f"http://127.0.0.1:{ports[2]}",
        key_file=work / "run" / "torchserve" / "key_file.json",
        timeout_s=timeout_s,
    )
    return env, config


def timed(fn: Callable[[], object], rounds: int, items: int) -> list[float]:
    out = []
    for _ in range(rounds * items):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(args: argparse.Namespace) -> Results:
    torch.manual_seed(0)
    config = UNetConfig(
        in_channels=5, num_classes=len(FLAIR_CLASSES), base_channels=args.base_channels, depth=args.depth
    )
    work = Path(tempfile.mkdtemp(prefix="terradapt-bench-"))
    registry = ModelRegistry(FileSystemStore(work / "registry"))
    manifest = ModelManifest(config=config.to_dict(), classes=FLAIR_CLASSES, bands=FLAIR_BANDS)
    weights, manifest_json = encode(UNet(config), manifest)
    registry.publish_source(weights, ModelManifest.model_validate_json(manifest_json))
    data = SyntheticDataset({REGION: args.tiles}, size=args.size, seed=0)
    tiles: list[npt.NDArray[np.uint8]] = [data.load(REGION, t).image for t in data.tile_ids(REGION)]

    env, ts_config = torchserve_settings(work, timeout_s=120)
    results = Results(load_before=load_average())
    subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, timeout=300)
    try:
        client = TorchServeClient(ts_config)
        deployer = TorchServeDeployer(client, registry, work / "run" / "torchserve" / "model-store")
        t0 = time.perf_counter()
        deployer.sync(REGION)
        results.register_s = time.perf_counter() - t0
        local = InProcessPredictor(registry, device="cpu", window=max(512, args.size), batch_size=4)
        served = TorchServePredictor(client)
        name = model_name(REGION)
        for tile in tiles[:3]:  # warm-up: model load, oneDNN primitives, connections
            local.predict(REGION, [tile])
            served.predict(REGION, [tile])

        # latency, one tile per call
        it_local = iter(tiles * args.rounds)
        results.local_latency = Stats.of(
            timed(lambda: local.predict(REGION, [next(it_local)]), args.rounds, len(tiles))
        )
        handler_ms: list[float] = []
        encode_s: list[float] = []
        served_s: list[float] = []
        for tile in tiles * args.rounds:
            t0 = time.perf_counter()
            body = encode_tile(tile)
            t1 = time.perf_counter()
            payload = client.predict(name, body)
            decode_prediction(payload)
            served_s.append(time.perf_counter() - t0)
            encode_s.append(t1 - t0)
            handler_ms.append(float(payload["latency_ms"]))
        results.served_latency = Stats.of(served_s)
        results.handler_latency = Stats.of([ms / 1000.0 for ms in handler_ms])
        results.encode_ms = 1000.0 * statistics.mean(encode_s)

        # throughput, all tiles at once
        t0 = time.perf_counter()
        local.predict(REGION, tiles)
        results.local_tps = len(tiles) / (time.perf_counter() - t0)
        lock = threading.Lock()
        done = [0]

        def one(tile: npt.NDArray[np.uint8]) -> None:
            served.predict(REGION, [tile])
            with lock:
                done[0] += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            list(pool.map(one, tiles))
        results.served_tps = done[0] / (time.perf_counter() - t0)
        client.close()
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, check=False, timeout=120)
        if args.keep:
            print(f"kept {work} (TorchServe logs in run/logs)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results.load_after = load_average()
    return results


def render(args: argparse.Namespace, results: Results, info: dict[str, str]) -> str:
    empty = Stats(0.0, 0.0, 0.0)
    loc = results.local_latency or empty
    srv = results.served_latency or empty
    hnd = results.handler_latency or empty
    command = (
        f".venv/bin/python bench/serving.py --tiles {args.tiles} --size {args.size} --rounds {args.rounds} "
        f"--concurrency {args.concurrency} --base-channels {args.base_channels} --depth {args.depth}"
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""## Serving: TorchServe vs in-process predictor

Command: `{command}` ({when})

Machine: {info["nproc"]} CPU(s), {info["cpu"]}; Python {info["python"]}, torch {info["torch"]}
({info["torch threads"]} intra-op threads), TorchServe {info["torchserve"]}, Java frontend on the same host.
Load average before / after: {results.load_before} / {results.load_after} (a shared machine: compare the
two columns of one run, not runs of different days).

Model: UNet base_channels={args.base_channels}, depth={args.depth}, 13 classes, 5 bands, random weights (latency
does not depend on them); {args.tiles} synthetic {args.size} x {args.size} tiles of {REGION}, {args.rounds} rounds.
TorchServe: 1 worker, batchSize 1, token auth on, GeoTIFF request body, JSON answer (zlib class map + features).

| per tile, sequential           | p50 ms | p99 ms | mean ms |
|--------------------------------|-------:|-------:|--------:|
| in-process predictor           | {loc.p50_ms:6.1f} | {loc.p99_ms:6.1f} | {loc.mean_ms:7.1f} |
| TorchServe (client end to end) | {srv.p50_ms:6.1f} | {srv.p99_ms:6.1f} | {srv.mean_ms:7.1f} |
| of which handler compute       | {hnd.p50_ms:6.1f} | {hnd.p99_ms:6.1f} | {hnd.mean_ms:7.1f} |

GeoTIFF encoding on the client: {results.encode_ms:.1f} ms per tile. Registration (package + synchronous
register): {results.register_s:.1f} s.

| throughput, all tiles at once                              | tiles/s |
|------------------------------------------------------------|--------:|
| in-process, one call (batches of 4)                        | {results.local_tps:7.2f} |
| {f"TorchServe, {args.concurrency} client thread(s), 1 worker":<58} | {results.served_tps:7.2f} |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    parser.add_argument("--keep", action="store_true", help="keep the temporary registry, model store and logs")
    args = parser.parse_args()
    info = machine()
    section = render(args, run(args), info)
    print(section)
    if not args.no_write:
        write_section("serving", section)
        print(f"updated {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
