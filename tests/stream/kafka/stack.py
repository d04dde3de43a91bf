"""A terradapt stack on the real local services: its own topics, buckets and consumer groups per test.

Workers run as real subprocesses (``terradapt worker`` / ``terradapt adapt-worker``) so tests can SIGKILL them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from serving.minio_store import MinioStore, minio_client
from serving.registry import ModelRegistry
from stream.bootstrap import bootstrap_registry
from stream.config import Settings, load_settings
from stream.kafka.ingest import ingest, make_producer
from stream.kafka.security import client_options
from stream.kafka.topics import ensure_topics
from stream.topics import Topics
from terradapt.capture_time import CaptureTimes
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest

REQUIRED = ("TERRADAPT_KAFKA__BOOTSTRAP", "TERRADAPT_S3__ACCESS_KEY", "TERRADAPT_S3__SECRET_KEY")
TERRADAPT = str(Path(sys.executable).with_name("terradapt"))
#: the objects a worker writes per acquisition under ``<region>/<id>``: the COG, its GDAL category-name sidecar, the
#: acquisition item it was made from, and the prediction's STAC item
PREDICTION_FILES = (".tif", ".tif.aux.xml", ".acquisition.json", ".json")


def prediction_keys(acqs: Iterable[Any]) -> list[str]:
    """Every object key the predictions bucket must hold for ``acqs``: one set of prediction files each."""
    return sorted(f"{a.region}/{a.id}{suffix}" for a in acqs for suffix in PREDICTION_FILES)


def require_services() -> None:
    """Fail (never skip) when the services `make test` starts are not configured."""
    missing = [k for k in REQUIRED if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"real services not configured ({', '.join(missing)} unset): run `make test`, or "
            '`make services-up && eval "$(bash deploy/local/services.sh env)"`'
        )


class Stack:
    """Settings, clients and worker processes of one isolated stack."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None) -> None:
        require_services()
        tag = uuid.uuid4().hex[:8]
        self.root = root
        self.env = dict(os.environ)
        self.env.update(
            {
                "TERRADAPT_KAFKA__TOPIC_PREFIX": f"t{tag}.",
                "TERRADAPT_KAFKA__PARTITIONS": "2",
                "TERRADAPT_STREAM__APP_ID": f"t{tag}",
                "TERRADAPT_S3__BUCKET_MODELS": f"t{tag}-models",
                "TERRADAPT_S3__BUCKET_PREDICTIONS": f"t{tag}-predictions",
                "TERRADAPT_S3__BUCKET_ACQUISITIONS": f"t{tag}-acquisitions",
                "TERRADAPT_RUNTIME__DEVICE": "cpu",
                "OMP_NUM_THREADS": "1",
            }
        )
        self.env.update(extra_env or {})
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            self.settings: Settings = load_settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.topics = Topics.with_prefix(self.settings.kafka.topic_prefix)
        ensure_topics(self.settings.kafka, self.topics)
        self.client = minio_client(self.settings.s3)
        self.models = MinioStore(self.client, self.settings.s3.bucket_models)
        self.predictions = MinioStore(self.client, self.settings.s3.bucket_predictions)
        self.acquisitions = MinioStore(self.client, self.settings.s3.bucket_acquisitions)
        self.registry = ModelRegistry(self.models)
        self.producer: KafkaProducer = make_producer(self.settings.kafka)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def publish_source(self, checkpoint: Path, calibration_images: list[np.ndarray]) -> None:
        """Source model + calibration into this stack's registry (what `terradapt registry-init` does)."""
        manifest = ModelManifest.model_validate_json((checkpoint / MANIFEST_FILE).read_bytes())
        weights = (checkpoint / WEIGHTS_FILE).read_bytes()
        bootstrap_registry(self.registry, weights, manifest, calibration_images, device="cpu")

    # -- processes -------------------------------------------------------------------------------------------
    def start(self, name: str, command: str, extra_env: dict[str, str] | None = None) -> None:
        """Start ``terradapt <command>`` as a process of its own (its own session, killable)."""
        self.start_argv(name, [TERRADAPT, command], extra_env)

    def start_module(self, name: str, module: str, extra_env: dict[str, str] | None = None) -> None:
        """Start ``python -m <module>`` (a test's instrumented worker) like ``start`` does."""
        self.start_argv(name, [sys.executable, "-m", module], extra_env)

    def start_argv(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        """Start ``argv`` with this stack's environment, its output appended to ``<root>/<name>.log``."""
        log = self.root / f"{name}.log"
        self.logs[name] = log
        fh = log.open("ab")
        self.procs[name] = subprocess.Popen(
            argv,
            env={**self.env, **(extra_env or {})},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str) -> None:
        """SIGKILL a worker (no clean shutdown, no offset commit)."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def pause(self, name: str) -> None:
        """SIGSTOP a worker: frozen, it keeps its partitions until its session times out, and processes nothing."""
        os.killpg(self.procs[name].pid, signal.SIGSTOP)

    def stop_all(self) -> None:
        """SIGTERM every worker, SIGKILL after a grace period."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            self.procs.pop(name)
        self.producer.close()

    def log_text(self, name: str) -> str:
        """A worker's log so far."""
        return self.logs[name].read_text(errors="replace")

    def wait_for_log(self, name: str, text: str, timeout_s: float = 120.0) -> None:
        """Wait until a worker's log contains ``text`` (a worker state reached), failing with the log's tail."""
        self.wait_for_log_count(name, text, 1, timeout_s)

    def count_log(self, name: str, text: str) -> int:
        """How many times a worker's log contains ``text`` so far."""
        return self.log_text(name).count(text)

    def wait_for_log_count(self, name: str, text: str, count: int, timeout_s: float = 120.0) -> None:
        """Wait until a worker's log contains ``text`` at least ``count`` times (e.g. k messages processed)."""
        deadline = time.monotonic() + timeout_s
        while self.count_log(name, text) < count:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited {proc.returncode}: {self.log_text(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name}: {text!r} not logged {count} times after {timeout_s}s: {self.log_text(name)[-3000:]}"
                )
            time.sleep(0.1)

    # -- data ------------------------------------------------------------------------------------------------
    def ingest(self, paths: Iterable[Path], region: str, times: CaptureTimes | None = None) -> list[Any]:
        """Upload + publish acquisitions like `terradapt ingest`; fail when one stayed unpublished.

        ``times`` dates the tiles (the fakes carry no capture time: undated by default, as ``--allow-undated``).
        """
        report = ingest(paths, region, self.acquisitions, self.producer, self.topics.acquisitions, times=times)
        if not report.ok:
            raise RuntimeError(report.summary())
        return report.acquisitions

    def send_raw(self, key: str, value: bytes) -> None:
        """Publish an arbitrary payload on the acquisitions topic."""
        self.producer.send(self.topics.acquisitions, key=key.encode(), value=value).get(timeout=30)

    def read(self, topic: str, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """Every message of a topic so far (JSON)."""
        consumer = KafkaConsumer(
            getattr(self.topics, topic),
            **client_options(self.settings.kafka),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=int(timeout_s * 1000),
        )
        try:
            return [json.loads(m.value) for m in consumer]
        finally:
            consumer.close()

    def read_keyed(self, topic: str, timeout_s: float = 2.0) -> list[tuple[str, bytes]]:
        """Every (key, raw value) of a topic by its full name so far (e.g. a faust table's changelog)."""
        consumer = KafkaConsumer(
            topic,
            **client_options(self.settings.kafka),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=int(timeout_s * 1000),
        )
        try:
            return [(m.key.decode() if m.key else "", m.value) for m in consumer]
        finally:
            consumer.close()

    def table(self, name: str) -> dict[str, bytes]:
        """A stream-worker table as its changelog leaves it: the last value of every key (tombstones drop it)."""
        out: dict[str, bytes] = {}
        for raw_key, value in self.read_keyed(f"{self.settings.stream.app_id}-worker-{name}-changelog"):
            key = json.loads(raw_key)  # faust writes a str-keyed table's keys as JSON strings
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    def wait_for(
        self, topic: str, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 120.0
    ) -> list[dict[str, Any]]:
        """Poll a topic until ``done(messages)``; fail with the worker logs' tails when it times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            msgs = self.read(topic, timeout_s=1.0)
            if done(msgs):
                return msgs
            if time.monotonic() > deadline:
                tails = {n: self.log_text(n)[-3000:] for n in self.logs}
                raise TimeoutError(f"{topic}: condition not met after {timeout_s}s ({len(msgs)} messages); {tails}")
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited {proc.returncode}: {self.log_text(name)[-3000:]}")
            time.sleep(0.5)
