"""``terradapt ingest`` through a real broker outage: a private Kafka is SIGKILLed and restarted under the command.

The broker is this test's own (``PrivateServices``, free ports, its own data folder); objects go to the shared MinIO
in a bucket of the test's own. The command runs as a process, as a user runs it; its output is read line by line
and the broker restarts when the command reports its first retry (an event, not a sleep). The topic is read back
up to its end offsets, so "exactly once per id" is checked on what the broker really holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from serving.minio_store import MinioStore, minio_client
from stream.config import load_settings
from stream.kafka.ingest import object_key
from stream.kafka.security import client_options
from stream.kafka.topics import ensure_topics
from stream.topics import Topics
from terradapt.settings import KafkaConfig, S3Config
from tests.stream.kafka.private_services import PrivateServices
from tests.stream.kafka.stack import require_services

pytestmark = pytest.mark.services

TERRADAPT = str(Path(sys.executable).with_name("terradapt"))
REGION = "D033"


class Broker:
    """A private Kafka with the test's topics created, and the client environment of a command using it."""

    def __init__(self, root: Path, bucket: str) -> None:
        require_services()  # the shared MinIO's credentials
        self.services = PrivateServices(root, ("kafka",))
        self.services.up()
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TERRADAPT_KAFKA__")}
        self.env.update({k: v for k, v in self.services.env().items() if k.startswith("TERRADAPT_KAFKA__")})
        self.env.update(
            {
                "TERRADAPT_KAFKA__TOPIC_PREFIX": self.prefix,
                "TERRADAPT_S3__BUCKET_ACQUISITIONS": bucket,
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "250",
                "OMP_NUM_THREADS": "1",
            }
        )
        self.kafka = KafkaConfig.model_validate(
            {k[len("TERRADAPT_KAFKA__") :].lower(): v for k, v in self.env.items() if k.startswith("TERRADAPT_KAFKA__")}
        )
        self.topic = Topics.with_prefix(self.prefix).acquisitions
        ensure_topics(self.kafka, Topics.with_prefix(self.prefix))  # auto-creation is off on the broker

    def ids(self) -> Counter[str]:
        return topic_ids(self.kafka, self.topic)


def topic_ids(kafka: KafkaConfig, topic: str) -> Counter[str]:
    """Acquisition ids on a topic, counted, read up to the end offsets the broker reports now."""
    consumer = KafkaConsumer(**client_options(kafka), enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert parts, f"topic {topic} has no partitions"
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out: Counter[str] = Counter()
        while any(consumer.position(p) < end[p] for p in parts):
            for records in consumer.poll(timeout_ms=1000).values():
                out.update(json.loads(r.value)["id"] for r in records)
        return out
    finally:
        consumer.close()


class IngestCommand:
    """``terradapt ingest`` as a process; its output read as it comes, ``retrying`` set at ``service``'s first retry."""

    def __init__(self, paths: list[Path], env: dict[str, str], service: str = "kafka") -> None:
        self.service = service
        self.proc = subprocess.Popen(
            [TERRADAPT, "ingest", *map(str, paths), "--region", REGION, "--allow-undated"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.retrying = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if f"{self.service} unavailable" in line and " retry " in line:
                self.retrying.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout_s: float = 300.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(timeout=30)
        return code


@pytest.fixture
def bucket() -> Iterator[str]:
    """A bucket of this test's own on the shared MinIO, removed afterwards."""
    require_services()
    name = f"ingest-{uuid.uuid4().hex[:12]}"
    yield name
    client = minio_client(load_settings().s3)
    if client.bucket_exists(name):
        for obj in client.list_objects(name, recursive=True):
            client.remove_object(name, str(obj.object_name))
        client.remove_bucket(name)


@pytest.fixture
def broker(tmp_path: Path, bucket: str) -> Iterator[Broker]:
    b = Broker(tmp_path / "services", bucket)
    try:
        yield b
    finally:
        b.services.down()


@pytest.fixture
def files(tiles: dict[str, list[Path]]) -> list[Path]:
    return tiles["D033"][:3]


def _id(path: Path) -> str:
    return f"{REGION}-{hashlib.sha256(path.read_bytes()).hexdigest()[:20]}"


def test_ingest_started_while_the_broker_is_down_publishes_everything_once_it_returns(broker, files):
    broker.services.kill("kafka")
    command = IngestCommand(
        files,
        {
            **broker.env,
            "TERRADAPT_INGEST__DEADLINE_S": "600",
            "TERRADAPT_INGEST__ATTEMPT_TIMEOUT_S": "2",
            "TERRADAPT_INGEST__BACKOFF_MAX_S": "2",
        },
    )
    assert command.retrying.wait(timeout=120), command.output  # the command is riding out the outage
    assert command.proc.poll() is None, command.output
    broker.services.up("kafka")
    assert command.wait() == 0, command.output
    assert f"published 3 of 3 files to {broker.topic} (uploaded 3, already stored 0); unpublished 0" in command.output
    assert broker.ids() == Counter({_id(p): 1 for p in files})  # every file published, exactly once per id


def test_a_run_past_its_deadline_reports_every_file_then_a_rerun_publishes_without_uploading(broker, bucket, files):
    broker.services.kill("kafka")
    env = {**broker.env, "TERRADAPT_INGEST__DEADLINE_S": "3", "TERRADAPT_INGEST__ATTEMPT_TIMEOUT_S": "1"}
    first = IngestCommand(files, env)
    assert first.wait() == 1, first.output
    assert f"published 0 of 3 files to {broker.topic} (uploaded 3, already stored 0); unpublished 3" in first.output
    for path in files:
        assert f"unpublished {path}: not published: " in first.output
    assert "deadline 3 s" in first.output
    store = MinioStore(minio_client(load_settings().s3), bucket, create=False)
    for path in files:  # the objects were stored (with their checksum) while the broker was away
        data = path.read_bytes()
        info = store.stat(object_key(REGION, hashlib.sha256(data).hexdigest()))
        assert info is not None and info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)

    broker.services.up("kafka")
    again = IngestCommand(files, {**broker.env, "TERRADAPT_INGEST__ATTEMPT_TIMEOUT_S": "5"})
    assert again.wait() == 0, again.output
    assert f"published 3 of 3 files to {broker.topic} (uploaded 0, already stored 3); unpublished 0" in again.output
    assert broker.ids() == Counter({_id(p): 1 for p in files})


def test_minio_store_keeps_the_sha256_and_creates_its_bucket_on_first_put(bucket):
    store = MinioStore(minio_client(load_settings().s3), bucket, create=False)
    assert store.stat("D033/x.tif") is None  # no bucket yet: absent, not an error
    sha = hashlib.sha256(b"tile").hexdigest()
    uri = store.put_with_sha256("D033/x.tif", b"tile", sha, "image/tiff")
    assert uri == f"s3://{bucket}/D033/x.tif" and store.get("D033/x.tif") == b"tile"
    info = store.stat("D033/x.tif")
    assert info is not None and info.sha256 == sha and info.size == 4
    store.put("D033/plain.tif", b"plain")
    plain = store.stat("D033/plain.tif")
    assert plain is not None and plain.sha256 is None and plain.size == 5


def test_ingest_rides_out_an_object_store_outage(tmp_path, files):
    """A private MinIO, killed before the command starts and restarted at its first retry; Kafka is the shared one."""
    require_services()
    services = PrivateServices(tmp_path / "services", ("minio",))
    services.up()
    try:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        env = {**os.environ, **{k: v for k, v in services.env().items() if k.startswith("TERRADAPT_S3__")}}
        env.update(
            {
                "TERRADAPT_KAFKA__TOPIC_PREFIX": prefix,
                "TERRADAPT_S3__BUCKET_ACQUISITIONS": "acquisitions",
                "TERRADAPT_INGEST__DEADLINE_S": "600",
                "TERRADAPT_INGEST__BACKOFF_MAX_S": "2",
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "250",
                "OMP_NUM_THREADS": "1",
            }
        )
        settings = load_settings()
        kafka = settings.kafka.model_copy(update={"topic_prefix": prefix})
        ensure_topics(kafka, Topics.with_prefix(prefix))
        services.kill("minio")
        command = IngestCommand(files, env, service="store")
        assert command.retrying.wait(timeout=120), command.output
        assert command.proc.poll() is None, command.output
        services.up("minio")
        assert command.wait() == 0, command.output
        assert "published 3 of 3 files" in command.output and "(uploaded 3, already stored 0)" in command.output
        assert topic_ids(kafka, Topics.with_prefix(prefix).acquisitions) == Counter({_id(p): 1 for p in files})
        private = {k[len("TERRADAPT_S3__") :].lower(): v for k, v in env.items() if k.startswith("TERRADAPT_S3__")}
        store = MinioStore(minio_client(S3Config.model_validate(private)), "acquisitions", create=False)
        for path in files:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            info = store.stat(object_key(REGION, sha))
            assert info is not None and info.sha256 == sha
    finally:
        services.down()
