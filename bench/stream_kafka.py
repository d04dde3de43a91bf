"""The Kafka half of ``bench/stream.py``: private Kafka + MinIO, ``terradapt worker`` processes, publish, observe.

Kafka and MinIO are started with ``deploy/local/services.sh`` on free loopback ports of their own (never the
default 19092 / 19000 that ``make test`` and CI use) under a run folder of their own, and stopped at the end. Each
(model, worker settings) pair gets its own topic prefix and consumer group, so no run sees another's messages;
each run streams fresh regions (an acquisition id is region + content hash), one region per partition.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import Stats, free_ports  # noqa: E402
from bench.stream_report import KafkaRun, LatencyRun  # noqa: E402
from serving.minio_store import MinioStore, minio_client  # noqa: E402
from serving.registry import ModelRegistry  # noqa: E402
from stream.config import Settings, StreamConfig, load_settings  # noqa: E402
from stream.kafka.ingest import acquisition_for, make_producer  # noqa: E402
from stream.kafka.security import client_options  # noqa: E402
from stream.kafka.topics import ensure_topics  # noqa: E402
from stream.topics import Topics  # noqa: E402
from terradapt.records import Acquisition  # noqa: E402

SERVICES_SH = ROOT / "deploy" / "local" / "services.sh"
TERRADAPT = str(Path(sys.executable).with_name("terradapt"))
#: what make test / CI listen on: never used here
RESERVED_PORTS = frozenset({19090, 19092, 19093, 19000, 19001})
PARTITIONS = 4
READY = "Worker ready"  # faust logs it once its partitions are assigned and its tables recovered
PROCESSED = "processed acquisition"
WARM_UP_S = 240.0  # first tile per region: model load from MinIO, monitor calibration, rebalance
CRASHED = "Last crash reason"  # faust's supervisor restarting a dead agent (it would then wait forever)


# -- services -----------------------------------------------------------------------------------------------------
class PrivateServices:
    """Kafka + MinIO under ``root`` (``TERRADAPT_RUN_DIR``) on free loopback ports."""

    def __init__(self, root: Path) -> None:
        ports = [p for p in free_ports(8) if p not in RESERVED_PORTS][:4]
        if len(ports) < 4:
            raise RuntimeError("no four free loopback ports outside the reserved ones")
        self.root = root
        self.script_env = {
            "TERRADAPT_RUN_DIR": str(root),
            "TERRADAPT_KAFKA_PORT": str(ports[0]),
            "TERRADAPT_KAFKA_CONTROLLER_PORT": str(ports[1]),
            "TERRADAPT_MINIO_PORT": str(ports[2]),
            "TERRADAPT_MINIO_CONSOLE_PORT": str(ports[3]),
        }

    def _run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            ["bash", str(SERVICES_SH), *args],
            env={**clean_environ(), **self.script_env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"services.sh {' '.join(args)} exit {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    def up(self) -> dict[str, str]:
        """Start Kafka and MinIO, wait until healthy; return the client settings (``services.sh env``)."""
        self._run("up", "kafka", "minio")
        out = {}
        for line in self._run("env").splitlines():
            if line.startswith("export TERRADAPT_KAFKA__") or line.startswith("export TERRADAPT_S3__"):
                key, _, value = line.removeprefix("export ").partition("=")
                out[key] = value
        return out

    def down(self) -> None:
        self._run("down", "kafka", "minio", timeout=120)

    @property
    def ports(self) -> str:
        env = self.script_env
        return f"Kafka {env['TERRADAPT_KAFKA_PORT']}, MinIO {env['TERRADAPT_MINIO_PORT']}"


def clean_environ() -> dict[str, str]:
    """This process's environment without terradapt settings (``TERRADAPT_<SECTION>__...``, ``TERRADAPT_CONFIG``).

    A shell that exported the shared services' settings must not point the benchmark's workers at them.
    """
    return {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("TERRADAPT_") and ("__" in k or k == "TERRADAPT_CONFIG"))
    }


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a worker started with ``env`` reads."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# -- worker settings compared -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    label: str
    env: dict[str, str]


def variants() -> list[Variant]:
    """The defaults, and ``batch_max_tiles=1`` too when the stream settings have micro-batching (run-time check)."""
    fields = StreamConfig.model_fields
    if "batch_max_tiles" not in fields:
        return [Variant("defaults (no stream.batch_max_tiles setting)", {})]
    defaults = StreamConfig()
    shown = ", ".join(
        f"{name}={getattr(defaults, name)}" for name in ("batch_max_tiles", "batch_wait_ms") if name in fields
    )
    return [
        Variant(f"defaults ({shown})", {}),
        Variant("batch_max_tiles=1", {"TERRADAPT_STREAM__BATCH_MAX_TILES": "1"}),
    ]


# -- tiles and regions --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredTile:
    """A tile uploaded once; any number of acquisitions (of fresh regions) point at it."""

    acquisition: Acquisition  # region and id are replaced per use
    sha256: str


def upload_pool(store: MinioStore, size: int, pool: list[bytes]) -> list[StoredTile]:
    out = []
    for i, data in enumerate(pool):
        href = store.put(f"pool/{size}/{i:04d}.tif", data, "image/tiff")
        acq = acquisition_for(data, "pool-0", href)
        out.append(StoredTile(acq, acq.sha256 or ""))
    return out


def acquisition(tile: StoredTile, region: str) -> Acquisition:
    return tile.acquisition.model_copy(
        update={"region": region, "id": f"{region}-{tile.sha256[:20]}", "datetime": datetime.now(UTC)}
    )


def partition_of(key: str) -> int:
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


class RegionNames:
    """Fresh region codes (``bench-<n>``), one per partition per call: every run streams regions never seen."""

    def __init__(self) -> None:
        self._numbers = count()

    def fresh(self) -> list[str]:
        chosen: dict[int, str] = {}
        while len(chosen) < PARTITIONS:
            name = f"bench-{next(self._numbers)}"
            chosen.setdefault(partition_of(name), name)
        return [chosen[p] for p in range(PARTITIONS)]


def round_robin(regions: list[str], tiles: list[StoredTile], n: int, start: int) -> list[Acquisition]:
    """``n`` acquisitions over ``regions`` in turn; within a region every tile is different (distinct ids)."""
    if n > len(regions) * (len(tiles) - start):
        raise ValueError(f"{n} acquisitions need more than {len(tiles)} pool tiles")
    return [acquisition(tiles[start + i // len(regions)], regions[i % len(regions)]) for i in range(n)]


# -- reading the predictions topic --------------------------------------------------------------------------------
class Collector:
    """A thread that reads the predictions and dead-letter topics and notes when each prediction was seen."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.consumer = KafkaConsumer(
            **client_options(settings.kafka), enable_auto_commit=False, fetch_max_wait_ms=10, group_id=None
        )
        tps = [TopicPartition(t, p) for t in (topics.predictions, topics.deadletter) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.deadletter = topics.deadletter
        self.seen: dict[str, float] = {}  # acquisition id -> time.monotonic() when its prediction was read
        self.dead: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-collector", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            batches = self.consumer.poll(timeout_ms=100)
            now = time.monotonic()
            with self._cond:
                for tp, records in batches.items():
                    for rec in records:
                        value = json.loads(rec.value)
                        if tp.topic == self.deadletter:
                            self.dead.append(f"{value.get('reason')}: {str(value.get('error'))[:300]}")
                        else:
                            self.seen.setdefault(value["acquisition_id"], now)
                self._cond.notify_all()

    def wait(self, ids: list[str], timeout_s: float, alive: Callable[[], str | None]) -> None:
        """Until every id was seen. Raises: RuntimeError on a dead letter, a dead worker or the timeout."""
        deadline = time.monotonic() + timeout_s
        dead_before = len(self.dead)
        with self._cond:
            while not all(i in self.seen for i in ids):
                if len(self.dead) > dead_before:
                    raise RuntimeError(f"dead letter: {self.dead[dead_before]}")
                problem = alive()
                if problem:
                    raise RuntimeError(problem)
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sum(i not in self.seen for i in ids)
                    raise RuntimeError(f"{missing} of {len(ids)} predictions not seen after {timeout_s:.0f} s")
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.consumer.close()


class LogWatch:
    """What a worker's log said so far, read incrementally (the log grows by a line per message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ready = False
        self.processed = 0
        self.crash: str | None = None
        self._offset = 0
        self._partial = b""
        self._last: list[str] = []

    def update(self) -> LogWatch:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
            self._offset += len(chunk)
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.ready = self.ready or READY in line
                self.processed += PROCESSED in line
                if self.crash is None and CRASHED in line:
                    self.crash = line[line.index(CRASHED) :][:500]
            self._last = (self._last + [ln.decode(errors="replace") for ln in lines])[-20:]
        return self

    def tail(self) -> str:
        return "\n".join(self._last)[-1500:]


# -- one stack: topics, consumer group, workers -------------------------------------------------------------------
@dataclass
class Stack:
    """One topic prefix and consumer group (one model, one worker setting), its workers and its observers."""

    name: str
    env: dict[str, str]
    logs: Path
    settings: Settings = field(init=False)
    topics: Topics = field(init=False)
    producer: KafkaProducer = field(init=False)
    collector: Collector = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    watches: dict[str, LogWatch] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.settings = settings_from(self.env)
        self.topics = Topics.with_prefix(self.settings.kafka.topic_prefix)
        ensure_topics(self.settings.kafka, self.topics)
        self.producer = make_producer(self.settings.kafka)
        self.collector = Collector(self.settings, self.topics)

    def log(self, worker: str) -> Path:
        return self.logs / f"{self.name}-{worker}.log"

    def start_worker(self, worker: str, timeout_s: float = 240.0) -> None:
        """``terradapt worker`` in a session of its own; returns once it logged that it is ready."""
        path = self.log(worker)
        with path.open("ab") as fh:
            self.procs[worker] = subprocess.Popen(
                [TERRADAPT, "worker"], env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.watches[worker] = LogWatch(path)
        deadline = time.monotonic() + timeout_s
        while not self.watches[worker].update().ready:
            problem = self.problem()
            if problem:
                raise RuntimeError(problem)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{worker} not ready after {timeout_s:.0f} s: {self.watches[worker].tail()}")
            time.sleep(0.2)

    def processed(self) -> dict[str, int]:
        return {w: watch.update().processed for w, watch in self.watches.items()}

    def problem(self) -> str | None:
        """A worker that exited, or whose agent crashed (faust restarts it, to wait forever), with its log's tail."""
        for worker, proc in self.procs.items():
            watch = self.watches[worker].update()
            if proc.poll() is not None:
                return f"{worker} exited {proc.returncode}: {watch.tail()}"
            if watch.crash:
                return f"{worker}: an agent crashed: {watch.crash}"
        return None

    def publish(self, acq: Acquisition) -> None:
        self.producer.send(self.topics.acquisitions, key=acq.region.encode(), value=acq.to_json())

    def warm_up(self, regions: list[str], tiles: list[StoredTile]) -> None:
        """One tile per region (the first of the pool), waited for: model loaded, monitors calibrated, rebalanced."""
        acqs = round_robin(regions, tiles, len(regions), 0)
        for acq in acqs:
            self.publish(acq)
        self.producer.flush()
        self.collector.wait([a.id for a in acqs], WARM_UP_S, self.problem)

    def throughput(self, regions: list[str], tiles: list[StoredTile], n: int, timeout_s: float) -> KafkaRun:
        """``n`` acquisitions published as fast as possible; first publish -> last prediction seen."""
        self.warm_up(regions, tiles)
        before = self.processed()
        acqs = round_robin(regions, tiles, n, 1)
        t0 = time.monotonic()
        for acq in acqs:
            self.publish(acq)
        self.producer.flush()
        ids = [a.id for a in acqs]
        self.collector.wait(ids, timeout_s, self.problem)
        last = max(self.collector.seen[i] for i in ids)
        after = self.processed()
        return KafkaRun(len(self.procs), n, last - t0, {w: after[w] - before.get(w, 0) for w in after})

    def latency(self, regions: list[str], tiles: list[StoredTile], n: int, rate: float, timeout_s: float) -> LatencyRun:
        """``n`` acquisitions at ``rate`` per second; each one's latency from just before its send."""
        self.warm_up(regions, tiles)
        acqs = round_robin(regions, tiles, n, 1)
        sent: dict[str, float] = {}
        start = time.monotonic()
        for i, acq in enumerate(acqs):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[acq.id] = time.monotonic()
            self.publish(acq)
            self.producer.flush()
        self.collector.wait(list(sent), timeout_s, self.problem)
        seconds = [self.collector.seen[i] - t for i, t in sent.items()]
        return LatencyRun(rate, n, Stats.of(seconds), 1000.0 * max(seconds))

    def stop_workers(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def close(self) -> None:
        self.stop_workers()
        with contextlib.suppress(Exception):
            self.producer.close(timeout=10)
        self.collector.close()


@contextlib.contextmanager
def services(root: Path) -> Iterator[tuple[PrivateServices, dict[str, str]]]:
    """Kafka + MinIO for the block; stopped however it ends."""
    svc = PrivateServices(root)
    try:
        env = svc.up()
        yield svc, env
    finally:
        svc.down()


@dataclass
class Deployment:
    """Everything the stacks of one benchmark run share: the service settings, buckets and uploaded tiles."""

    client_env: dict[str, str]
    threads: int
    logs: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    regions: RegionNames = field(default_factory=RegionNames)

    def base_env(self, model_key: str) -> dict[str, str]:
        bucket = f"b{self.tag}"
        safe = model_key.replace("-", "")
        return {
            **clean_environ(),
            **self.client_env,
            "TERRADAPT_KAFKA__PARTITIONS": str(PARTITIONS),
            "TERRADAPT_S3__BUCKET_MODELS": f"{bucket}-{safe}-models",
            "TERRADAPT_S3__BUCKET_PREDICTIONS": f"{bucket}-{safe}-predictions",
            "TERRADAPT_S3__BUCKET_ACQUISITIONS": f"{bucket}-acquisitions",
            "TERRADAPT_RUNTIME__DEVICE": "cpu",
            "OMP_NUM_THREADS": str(self.threads),
        }

    def stores(self, model_key: str) -> tuple[ModelRegistry, MinioStore]:
        """The model's registry and the shared acquisitions bucket (created here)."""
        settings = settings_from(self.base_env(model_key))
        client = minio_client(settings.s3)
        registry = ModelRegistry(MinioStore(client, settings.s3.bucket_models))
        return registry, MinioStore(client, settings.s3.bucket_acquisitions)

    def stack(self, model_key: str, variant: Variant, index: int) -> Stack:
        name = f"b{self.tag}{index}"
        env = {
            **self.base_env(model_key),
            **variant.env,
            "TERRADAPT_KAFKA__TOPIC_PREFIX": f"{name}.",
            "TERRADAPT_STREAM__APP_ID": name,
        }
        return Stack(name, env, self.logs)


def tiles_for(seconds: float, tps: float, pool: int, regions: int = PARTITIONS) -> int:
    """Acquisitions for a run of about ``seconds`` at ``tps``: a multiple of the regions, at least 2 per region."""
    n = regions * math.ceil(max(seconds * tps, 1.0) / regions)
    return int(np.clip(n, 2 * regions, regions * (pool - 1)))
