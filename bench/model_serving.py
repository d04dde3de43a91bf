"""Per-tile latency and peak memory of the FLAIR baseline next to the small U-Net: in-process vs TorchServe, one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/model_serving.py [--tiles 6] [--size 512] [--rounds 2]

Models (random weights: latency and memory do not depend on the weight values):

* ``small``: terradapt's small U-Net (base_channels 16, depth 3), the CPU default;
* ``flair-baseline``: the FLAIR #1 baseline, segmentation-models-pytorch Unet + resnet34, 5 bands, 13 classes,
  FLAIR normalisation (``terradapt.architectures.resolve_arch("flair-baseline", ...)``).

Both are published to a temporary FileSystemStore registry (one per model, region D033 / D034). Per model:

* in-process, in a child Python process of its own (so the models' memory does not mix): the bare forward
  ``model(x)`` under ``torch.no_grad`` and ``InProcessPredictor.predict``, one tile per call, sequential, after
  warm-up; peak RSS = the child's ``VmHWM`` (``/proc/self/status``; the high-water mark is reset through
  ``/proc/self/clear_refs`` once the model is loaded, so the growth while predicting is measured on its own).
  Not ``ru_maxrss``: Linux carries the parent's high-water mark over ``execve`` into the child's ``ru_maxrss``;
* TorchServe: its own TorchServe (``deploy/torchserve/torchserve.sh``, free loopback ports, temporary run dir,
  ``CUDA_VISIBLE_DEVICES=""`` so it runs on the CPU), the model registered through ``TorchServeDeployer``;
  ``TorchServePredictor.predict`` one tile per call (GeoTIFF encode + HTTP + handler + JSON decode) and the
  handler's own compute time (``latency_ms`` of its answer); peak RSS = ``VmHWM`` of the model's worker process
  (the descendant of the TorchServe frontend whose command line holds ``model_service_worker``), read after the
  timed calls. The models are registered one after the other (the first is unregistered before the second).
* with ``torch.cuda.is_available()``: the in-process measurements again on cuda (memory:
  ``torch.cuda.max_memory_allocated``); otherwise the output says "no GPU".

Rewrites the "bench/model_serving.py" section of docs/benchmarks.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.doc_section import DOC, write_section  # noqa: E402
from bench.model_serving_report import (  # noqa: E402
    MODELS,
    NAME,
    WARMUP,
    InProcess,
    ModelSpec,
    Row,
    Run,
    Served,
    render,
)
from bench.serving import SCRIPT, Stats, load_average, machine, timed, torchserve_settings  # noqa: E402
from serving.codec import HandlerConfig  # noqa: E402
from serving.packaging import model_name  # noqa: E402
from serving.predictor import InProcessPredictor  # noqa: E402
from serving.registry import ModelRegistry  # noqa: E402
from serving.store import FileSystemStore  # noqa: E402
from serving.torchserve import TorchServeClient, TorchServeDeployer, TorchServePredictor  # noqa: E402
from terradapt.architectures import model_from_config, resolve_arch  # noqa: E402
from terradapt.checkpoint import ModelManifest, encode  # noqa: E402
from terradapt.classes import FLAIR_BANDS, FLAIR_CLASSES  # noqa: E402
from terradapt.datasets.synthetic import SyntheticDataset  # noqa: E402
from terradapt.settings import TorchServeConfig  # noqa: E402

TILE_REGION = "D033"  # the synthetic tiles (the same tiles for both models)


# -- helpers ------------------------------------------------------------------------------------------------------
def proc_status_kib(pid: int | str, key: str) -> float:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def self_mib(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB."""
    return proc_status_kib("self", key) / 1024.0


def reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: ``5`` to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def gpu_line() -> str:
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return "no GPU (torch.cuda.is_available() is False): the cuda rows were not measured"


def build_registry(spec: ModelSpec, root: Path) -> tuple[ModelRegistry, int, float]:
    """A registry holding this model (random weights, seed 0) as the source version; (registry, params, MiB)."""
    torch.manual_seed(0)
    arch = resolve_arch(spec.key, in_channels=len(FLAIR_BANDS), num_classes=len(FLAIR_CLASSES))
    model = model_from_config(arch.config)
    if arch.normalisation is not None:
        model.set_normalisation(*arch.normalisation)
    registry = ModelRegistry(FileSystemStore(root))
    manifest = ModelManifest(config=arch.config.to_dict(), classes=FLAIR_CLASSES, bands=FLAIR_BANDS)
    weights, manifest_json = encode(model, manifest)
    registry.publish_source(weights, ModelManifest.model_validate_json(manifest_json))
    params = sum(p.numel() for p in model.parameters())
    return registry, params, len(weights) / 2**20


def make_tiles(n: int, size: int) -> npt.NDArray[np.uint8]:
    data = SyntheticDataset({TILE_REGION: n}, size=size, seed=0)
    return np.stack([data.load(TILE_REGION, t).image for t in data.tile_ids(TILE_REGION)])


# -- in-process (runs in a child process per model and device) ---------------------------------------------------
def measure_in_process(
    registry_dir: Path, region: str, tiles: npt.NDArray[np.uint8], device: str, rounds: int, window: int
) -> InProcess:
    rss_start = self_mib("VmRSS")
    local = InProcessPredictor(ModelRegistry(FileSystemStore(registry_dir)), device=device, window=window)
    model = local.model(region, 0)
    rss_loaded, hwm_load = self_mib("VmRSS"), self_mib("VmHWM")
    was_reset = reset_hwm()
    cuda = local.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tile_list = list(tiles)
    for tile in tile_list[:WARMUP]:
        local.predict(region, [tile])
    it_predict = iter(tile_list * rounds)
    predict = Stats.of(timed(lambda: local.predict(region, [next(it_predict)]), rounds, len(tile_list)))
    hwm_predict = self_mib("VmHWM")

    inputs = [torch.from_numpy(t[None]).float().to(local.device) for t in tile_list]

    def forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            model(x)
        if cuda:
            torch.cuda.synchronize()

    forward(inputs[0])
    it_forward = iter(inputs * rounds)
    fwd = Stats.of(timed(lambda: forward(next(it_forward)), rounds, len(inputs)))
    return InProcess(
        device=local.device.type,
        threads=torch.get_num_threads(),
        forward=fwd,
        predict=predict,
        rss_start_mib=rss_start,
        rss_loaded_mib=rss_loaded,
        hwm_load_mib=hwm_load,
        hwm_predict_mib=hwm_predict,
        hwm_reset=was_reset,
        cuda_peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    )


def child_main(raw: str) -> None:
    job = json.loads(raw)
    tiles = np.load(job["tiles"])
    result = measure_in_process(
        Path(job["registry"]), job["region"], tiles, job["device"], int(job["rounds"]), int(job["window"])
    )
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def run_child(job: dict[str, Any]) -> InProcess:
    """Measure in a fresh Python process: its memory holds only this model."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"in-process child ({job['region']}, {job['device']}) exit {proc.returncode}:\n{tail}")
    return InProcess.from_dict(json.loads(lines[-1].removeprefix("RESULT ")))


# -- TorchServe ---------------------------------------------------------------------------------------------------
class RecordingClient(TorchServeClient):
    """A TorchServe client that keeps the handler's ``latency_ms`` of every prediction it receives."""

    def __init__(self, config: TorchServeConfig) -> None:
        super().__init__(config)
        self.handler_ms: list[float] = []

    def predict(self, name: str, body: bytes | dict[str, Any], version: int | str | None = None) -> dict[str, Any]:
        payload = super().predict(name, body, version)
        if "latency_ms" in payload:
            self.handler_ms.append(float(payload["latency_ms"]))
        return payload


@dataclass
class TorchServe:
    work: Path
    env: dict[str, str]
    config: TorchServeConfig

    @property
    def model_store(self) -> Path:
        return self.work / "run" / "torchserve" / "model-store"

    def root_pid(self) -> int | None:
        """The Java frontend (or, before it wrote its pid file, the launcher)."""
        for pid_file in (
            self.work / "run" / "torchserve" / "tmp" / ".model_server.pid",
            self.work / "run" / "torchserve.pid",
        ):
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text.isdigit():
                return int(text)
        return None


def start_torchserve(work: Path) -> TorchServe:
    env, config = torchserve_settings(work, timeout_s=300)
    env["CUDA_VISIBLE_DEVICES"] = ""  # TorchServe on the CPU even where a GPU is present
    proc = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"torchserve.sh start exit {proc.returncode}:\n{tail}")
    return TorchServe(work, env, config)


def stop_torchserve(ts: TorchServe) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop"], env=ts.env, check=False, timeout=120, capture_output=True)


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process readable in /proc."""
    out: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        out[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return out


def worker_pids(root: int | None) -> set[int]:
    """Descendants of ``root`` whose command line holds ``model_service_worker`` (TorchServe's Python workers)."""
    if root is None:
        return set()
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            if b"model_service_worker" in procs[pid][1]:
                found.add(pid)
    return found


def proc_env(pid: int, key: str) -> str:
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for item in items:
        name, _, value = item.partition(b"=")
        if name.decode(errors="replace") == key:
            return value.decode(errors="replace")
    return "unset"


def measure_served(
    ts: TorchServe,
    client: RecordingClient,
    registry: ModelRegistry,
    region: str,
    tiles: npt.NDArray[np.uint8],
    rounds: int,
    window: int,
) -> Served:
    before = worker_pids(ts.root_pid())
    deployer = TorchServeDeployer(client, registry, ts.model_store, handler_config=HandlerConfig(window=window))
    t0 = time.perf_counter()
    deployer.sync(region)
    register_s = time.perf_counter() - t0
    try:
        predictor = TorchServePredictor(client)
        tile_list = list(tiles)
        for tile in tile_list[:WARMUP]:
            predictor.predict(region, [tile])
        client.handler_ms.clear()
        it = iter(tile_list * rounds)
        latency = Stats.of(timed(lambda: predictor.predict(region, [next(it)]), rounds, len(tile_list)))
        handler = Stats.of([ms / 1000.0 for ms in client.handler_ms])
        pids = worker_pids(ts.root_pid()) - before
        hwm = sum(proc_status_kib(p, "VmHWM") for p in pids) / 1024.0
        omp = ",".join(sorted({proc_env(p, "OMP_NUM_THREADS") for p in pids})) or "?"
    finally:
        client.unregister(model_name(region), 0)
    return Served(latency, handler, register_s, hwm, len(pids), omp)


# -- the run ------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> Run:
    t_start = time.perf_counter()
    info = machine()
    result = Run(rows=[], info=info, gpu=gpu_line(), load_before=load_average())
    print(result.gpu, flush=True)
    window = max(512, args.size)
    work = Path(tempfile.mkdtemp(prefix="terradapt-model-serving-"))
    try:
        tiles = make_tiles(args.tiles, args.size)
        tiles_file = work / "tiles.npy"
        np.save(tiles_file, tiles)
        registries: dict[str, ModelRegistry] = {}
        for spec in MODELS:
            registry, params, mib = build_registry(spec, work / f"registry-{spec.key}")
            registries[spec.key] = registry
            result.rows.append(Row(spec, params, mib))

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for row in result.rows:
            for device in devices:
                job = {
                    "registry": str(work / f"registry-{row.spec.key}"),
                    "region": row.spec.region,
                    "tiles": str(tiles_file),
                    "device": device,
                    "rounds": args.rounds,
                    "window": window,
                }
                t0 = time.perf_counter()
                try:
                    measured = run_child(job)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    row.errors.append(str(exc))
                    print(f"{row.spec.key} in-process {device}: FAILED {exc}", flush=True)
                    continue
                setattr(row, device, measured)
                print(
                    f"{row.spec.key} in-process {device}: forward {measured.forward.mean_ms:.0f} ms, "
                    f"predict {measured.predict.mean_ms:.0f} ms ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

        if args.skip_torchserve:
            result.torchserve_error = "skipped (--skip-torchserve)"
        else:
            t0 = time.perf_counter()
            try:
                ts = start_torchserve(work)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result.torchserve_error = f"TorchServe did not start: {exc}"
                print(result.torchserve_error, flush=True)
            else:
                result.torchserve_start_s = time.perf_counter() - t0
                print(f"TorchServe healthy in {result.torchserve_start_s:.0f} s", flush=True)
                client = RecordingClient(ts.config)
                try:
                    for row in result.rows:
                        t0 = time.perf_counter()
                        try:
                            row.served = measure_served(
                                ts, client, registries[row.spec.key], row.spec.region, tiles, args.rounds, window
                            )
                        except Exception as exc:  # reported in the section; the other model still runs
                            row.errors.append(f"TorchServe: {type(exc).__name__}: {exc}")
                            print(f"{row.spec.key} TorchServe: FAILED {exc}", flush=True)
                            continue
                        print(
                            f"{row.spec.key} TorchServe: {row.served.latency.mean_ms:.0f} ms per tile, worker "
                            f"peak RSS {row.served.worker_hwm_mib:.0f} MiB ({time.perf_counter() - t0:.0f} s)",
                            flush=True,
                        )
                finally:
                    client.close()
                    stop_torchserve(ts)
    finally:
        if args.keep:
            print(f"kept {work} (TorchServe logs in run/logs)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result.load_after = load_average()
    result.seconds = time.perf_counter() - t_start
    return result


# -- the section --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tiles", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-torchserve", action="store_true", help="in-process rows only")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    parser.add_argument("--keep", action="store_true", help="keep the temporary registries, model store and logs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    result = run(args)
    section = render(args, result)
    print(section)
    if not args.no_write:
        write_section(NAME, section)
        print(f"updated {DOC.relative_to(ROOT)}")
    if (result.torchserve_error and not args.skip_torchserve) or any(row.errors for row in result.rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
