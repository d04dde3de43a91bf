"""``terradapt ingest`` without services: backoff, the deadline, idempotent re-runs, the report, exit codes.

The broker and the object store are fakes that fail a chosen number of times; time is a fake clock whose ``sleep``
advances it, so backoff delays and deadlines are checked exactly and nothing waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from typer.testing import CliRunner

from serving.retrying import RetryEvent
from serving.store import MemoryStore, ObjectInfo
from stream.cli import app
from stream.config import ConfigError, IngestConfig, load_settings
from stream.kafka import ingest as ingest_module
from stream.kafka.ingest import FileResult, KafkaPublisher, ingest, object_key

TOPIC = "acquisitions"


class FakeClock:
    """Monotonic time that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class FakePublisher:
    """Fails its first ``failures`` calls with ``error`` (forever when None), then records what it publishes."""

    def __init__(self, failures: int | None = 0, error: Exception | None = None, clock: FakeClock | None = None):
        self.failures = failures
        self.error = error or KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        self.clock = clock
        self.calls = 0
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.closed = False

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            if self.clock is not None:
                self.clock.now += 2.0  # an attempt against an absent broker takes its timeout
            raise self.error
        self.sent.append((topic, key, value))

    def close(self) -> None:
        self.closed = True

    def ids(self) -> list[str]:
        return [json.loads(v)["id"] for _, _, v in self.sent]


class FakeStore(MemoryStore):
    """A MemoryStore that keeps sha256 metadata (a ``ChecksummedStore``) and fails its first calls."""

    def __init__(self, failures: int | None = 0) -> None:
        super().__init__("objects")
        self.failures = failures
        self.calls = 0
        self.puts: list[str] = []
        self.meta: dict[str, str] = {}

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise ConnectionError("Connection refused")

    def stat(self, key: str) -> ObjectInfo | None:
        self._maybe_fail()
        if not self.exists(key):
            return None
        return ObjectInfo(size=len(self.get(key)), sha256=self.meta.get(key))

    def put_with_sha256(
        self, key: str, data: bytes, sha256: str, content_type: str = "application/octet-stream"
    ) -> str:
        self._maybe_fail()
        self.puts.append(key)
        self.meta[key] = sha256
        return self.put(key, data, content_type)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """Three files of distinct content (not GeoTIFFs: ingest announces them anyway, the worker dead-letters)."""
    out = []
    for i in range(3):
        path = tmp_path / f"tile{i}.tif"
        path.write_bytes(f"not really a tiff {i}".encode() * 10)
        out.append(path)
    return out


def _id(path: Path, region: str = "D033") -> str:
    return f"{region}-{hashlib.sha256(path.read_bytes()).hexdigest()[:20]}"


def _config(**kw: float) -> IngestConfig:
    base: dict[str, float] = {"deadline_s": 30.0, "backoff_initial_s": 1.0, "backoff_max_s": 4.0, "jitter": 0.5}
    return IngestConfig(**{**base, **kw})


def test_a_healthy_run_uploads_and_publishes_every_file_keyed_by_region(files):
    store, pub = FakeStore(), FakePublisher()
    seen: list[FileResult] = []
    report = ingest(files, "D033", store, pub, TOPIC, seen.append, config=_config())
    assert report.ok and len(report.published) == 3 and len(report.uploaded) == 3 and not report.already_stored
    assert [r.path for r in seen] == files  # each outcome reported as it happens, in order
    assert pub.ids() == [_id(p) for p in files] and {k for _, k, _ in pub.sent} == {b"D033"}
    assert [a.id for a in report.acquisitions] == [_id(p) for p in files]
    key = object_key("D033", hashlib.sha256(files[0].read_bytes()).hexdigest())
    assert key == f"D033/{_id(files[0])}.tif" and report.acquisitions[0].href == f"memory://objects/{key}"
    assert report.summary().startswith("published 3 of 3 files to acquisitions (uploaded 3, already stored 0)")


def test_broker_outage_is_retried_with_exponential_backoff_and_jitter(files):
    clock = FakeClock()
    events: list[RetryEvent] = []
    pub = FakePublisher(failures=4, clock=clock)
    report = ingest(
        files[:1],
        "D033",
        FakeStore(),
        pub,
        TOPIC,
        config=_config(backoff_initial_s=1.0, backoff_max_s=4.0, jitter=0.5),
        on_retry=events.append,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(7),
    )
    assert report.ok and pub.ids() == [_id(files[0])]  # published once, after the outage
    assert [e.attempt for e in events] == [1, 2, 3, 4] and {e.service for e in events} == {"kafka"}
    assert "KafkaTimeoutError" in events[0].error and events[0].what == f"publish {_id(files[0])}"
    nominal = [1.0, 2.0, 4.0, 4.0]  # doubling, capped at backoff_max_s
    assert [e.delay_s for e in events] == clock.sleeps
    for delay, d in zip(clock.sleeps, nominal, strict=True):
        assert 0.5 * d <= delay <= d  # jitter draws from [(1 - jitter) d, d]
    assert len(set(clock.sleeps)) == 4  # really jittered


def test_seeded_jitter_is_reproducible(files):
    def delays(seed: int) -> list[float]:
        clock = FakeClock()
        ingest(
            files[:1],
            "D033",
            FakeStore(),
            FakePublisher(failures=3),
            TOPIC,
            config=_config(),
            clock=clock,
            sleep=clock.sleep,
            rng=random.Random(seed),
        )
        return clock.sleeps

    assert delays(3) == delays(3) != delays(4)


def test_deadline_bounds_an_outage_then_the_rest_of_the_run_does_not_wait(files):
    clock = FakeClock()
    store, pub = FakeStore(), FakePublisher(failures=None, clock=clock)
    events: list[RetryEvent] = []
    report = ingest(
        files,
        "D033",
        store,
        pub,
        TOPIC,
        config=_config(deadline_s=10.0, backoff_initial_s=1.0, backoff_max_s=2.0, jitter=0.0),
        on_retry=events.append,
        clock=clock,
        sleep=clock.sleep,
    )
    assert not report.ok and len(report.unpublished) == 3 and not report.published
    # each attempt takes 2 s; retries until 10 s after the first failure began, never sleeping past it
    assert clock.sleeps == [1.0, 2.0, 1.0] and clock.now - 1000.0 == pytest.approx(4 * 2.0 + 4.0)
    assert pub.calls == 4  # only the first file tried: the broker counts as down for the rest of the run
    first, *rest = report.unpublished
    assert first.reason is not None and "kafka unavailable for 12.0 s, 4 attempt(s), deadline 10 s" in first.reason
    assert all(r.reason is not None and r.reason.startswith("not published: not attempted: kafka") for r in rest)
    assert len(report.uploaded) == 3 and len(store.puts) == 3  # objects stored: a re-run only publishes
    assert all(f.acquisition is not None for f in report.files)
    summary = report.summary().splitlines()
    assert summary[0].endswith("unpublished 3") and all(str(p) in "\n".join(summary[1:]) for p in files)


def test_deadline_zero_means_a_single_attempt(files):
    clock = FakeClock()
    pub = FakePublisher(failures=1)
    report = ingest(
        files[:1], "D033", FakeStore(), pub, TOPIC, config=_config(deadline_s=0), clock=clock, sleep=clock.sleep
    )
    assert not report.ok and pub.calls == 1 and clock.sleeps == []


def test_a_rerun_uploads_nothing_again_and_publishes_the_same_ids(files):
    store = FakeStore()
    first = ingest(files, "D033", store, FakePublisher(failures=None), TOPIC, config=_config(deadline_s=0))
    assert len(first.uploaded) == 3 and not first.published
    pub = FakePublisher()
    again = ingest(files, "D033", store, pub, TOPIC, config=_config(deadline_s=0))
    assert again.ok and len(again.already_stored) == 3 and not again.uploaded
    assert len(store.puts) == 3  # nothing uploaded twice
    assert pub.ids() == [f.acquisition.id for f in first.files if f.acquisition is not None]
    third = FakePublisher()
    ingest(files, "D033", store, third, TOPIC)
    assert third.ids() == pub.ids()  # published again (at least once): same ids, the worker is idempotent


def test_a_key_holding_other_content_is_reported_never_skipped_or_overwritten(files):
    store = FakeStore()
    key = object_key("D033", hashlib.sha256(files[1].read_bytes()).hexdigest())
    store.put_with_sha256(key, b"something else", hashlib.sha256(b"something else").hexdigest())
    pub = FakePublisher()
    report = ingest(files, "D033", store, pub, TOPIC, config=_config(deadline_s=0))
    assert [f.published for f in report.files] == [True, False, True]
    bad = report.files[1]
    assert bad.reason is not None and "holds other content" in bad.reason and bad.stored is None
    assert store.get(key) == b"something else" and pub.ids() == [_id(files[0]), _id(files[2])]


def test_plain_blob_store_compares_the_stored_bytes(files):
    store = MemoryStore("plain")  # no sha256 metadata: the bytes are read back
    ingest(files[:2], "D033", store, FakePublisher(), TOPIC)
    key = object_key("D033", hashlib.sha256(files[1].read_bytes()).hexdigest())
    store.put(key, b"tampered")
    report = ingest(files[:2], "D033", store, FakePublisher(), TOPIC, config=_config(deadline_s=0))
    assert report.files[0].stored == "already-stored" and report.files[0].published
    assert report.files[1].reason is not None and "holds other content" in report.files[1].reason


def test_store_outage_is_retried_the_same_way_and_bounded(files):
    clock = FakeClock()
    events: list[RetryEvent] = []
    store, pub = FakeStore(failures=2), FakePublisher()
    report = ingest(
        files[:1],
        "D033",
        store,
        pub,
        TOPIC,
        config=_config(),
        on_retry=events.append,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(1),
    )
    assert report.ok and [(e.service, e.attempt) for e in events] == [("store", 1), ("store", 2)]
    assert "ConnectionError" in events[0].error and len(clock.sleeps) == 2

    clock = FakeClock()
    down, pub = FakeStore(failures=None), FakePublisher()
    report = ingest(
        files,
        "D033",
        down,
        pub,
        TOPIC,
        config=_config(deadline_s=5.0),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(2),
    )
    assert not report.ok and not pub.sent  # nothing announced without its object
    assert sum(clock.sleeps) == pytest.approx(5.0) and clock.now - 1000.0 == pytest.approx(5.0)  # never past it
    assert all(f.reason is not None and f.reason.startswith("not uploaded: ") for f in report.files)
    assert report.files[0].reason is not None and "store unavailable" in report.files[0].reason


def test_a_permanent_kafka_error_is_not_retried_and_the_run_goes_on(files):
    class OneTooLarge(FakePublisher):
        def publish(self, topic: str, key: bytes, value: bytes) -> None:
            self.calls += 1
            if self.calls == 1:
                raise MessageSizeTooLargeError("record too large")
            self.sent.append((topic, key, value))

    clock, pub = FakeClock(), OneTooLarge()
    report = ingest(files, "D033", FakeStore(), pub, TOPIC, config=_config(), clock=clock, sleep=clock.sleep)
    assert [f.published for f in report.files] == [False, True, True] and clock.sleeps == []
    assert report.files[0].reason is not None
    assert report.files[0].reason == "not published: [Error 10] MessageSizeTooLargeError: record too large"


def test_an_unreadable_file_is_reported(files, tmp_path):
    missing = tmp_path / "missing.tif"
    report = ingest([missing, files[0]], "D033", FakeStore(), FakePublisher(), TOPIC)
    assert [f.published for f in report.files] == [False, True]
    assert report.files[0].reason is not None and report.files[0].reason.startswith("unreadable: ")


def test_invalid_region_is_refused_before_anything_happens(files):
    store = FakeStore()
    with pytest.raises(ValueError, match="not a region code"):
        ingest(files, "bad region", store, FakePublisher(), TOPIC)
    assert not store.puts


# -- KafkaPublisher over a fake kafka-python producer ---------------------------------------------------------------
class FakeFuture:
    """A record's future: unacknowledged for ``pending`` waits, then acknowledged (or failed with ``error``)."""

    def __init__(self, pending: int, error: Exception | None = None) -> None:
        self.pending = pending
        self.error = error
        self.is_done = False

    def failed(self) -> bool:
        return self.is_done and self.error is not None

    def get(self, timeout: float | None = None) -> None:
        if self.pending > 0:
            self.pending -= 1
            raise KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
        self.is_done = True
        if self.error is not None:
            raise self.error


class FakeProducer:
    def __init__(self, futures: list[FakeFuture]) -> None:
        self.futures = futures
        self.sends = 0

    def send(self, topic: str, key: bytes, value: bytes) -> FakeFuture:
        self.sends += 1
        return self.futures.pop(0)


def test_publisher_waits_for_the_record_in_flight_instead_of_sending_it_twice(files):
    producer = FakeProducer([FakeFuture(pending=2)])
    builds: list[int] = []

    def factory() -> FakeProducer:
        builds.append(1)
        if len(builds) == 1:
            raise KafkaTimeoutError("Bootstrap timed out")  # the broker is away at start
        return producer

    publisher = KafkaPublisher(factory, timeout_s=1.0)
    clock = FakeClock()
    report = ingest(files[:1], "D033", FakeStore(), publisher, TOPIC, config=_config(), clock=clock, sleep=clock.sleep)
    assert report.ok and len(builds) == 2 and producer.sends == 1 and len(clock.sleeps) == 3


def test_publisher_sends_again_when_delivery_failed(files):
    producer = FakeProducer([FakeFuture(pending=0, error=KafkaTimeoutError("Batch expired")), FakeFuture(0)])
    publisher = KafkaPublisher(lambda: producer, timeout_s=1.0)
    clock = FakeClock()
    report = ingest(files[:1], "D033", FakeStore(), publisher, TOPIC, config=_config(), clock=clock, sleep=clock.sleep)
    assert report.ok and producer.sends == 2


# -- settings and the command line ----------------------------------------------------------------------------------
def test_ingest_settings_are_validated(monkeypatch):
    with pytest.raises(ValueError, match="backoff_max_s"):
        IngestConfig(backoff_initial_s=5, backoff_max_s=1)
    monkeypatch.setenv("TERRADAPT_INGEST__DEADLINE", "3")
    with pytest.raises(ConfigError, match="deadline_s"):
        load_settings()


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Run ``terradapt ingest`` on fakes; returns (invoke, store, publishers)."""
    for name in [k for k in os.environ if k.startswith("TERRADAPT_")]:
        monkeypatch.delenv(name)
    store = FakeStore()
    made: list[FakePublisher] = []
    failures: dict[str, int | None] = {"n": 0}

    def publisher(cls: object, kafka: object, config: IngestConfig) -> FakePublisher:
        made.append(FakePublisher(failures=failures["n"]))
        return made[-1]

    monkeypatch.setattr("serving.minio_store.minio_client", lambda config: object())
    monkeypatch.setattr("serving.minio_store.MinioStore", lambda client, bucket, create=True: store)
    monkeypatch.setattr(KafkaPublisher, "from_settings", classmethod(publisher))
    runner = CliRunner(env={"COLUMNS": "250"})

    def invoke(paths: list[Path], fail: int | None = 0, **env: str):
        failures["n"] = fail
        result = runner.invoke(
            app,
            ["ingest", *map(str, paths), "--region", "D033", "--allow-undated"],  # the fakes carry no date
            env={f"TERRADAPT_{k}": v for k, v in env.items()},
        )
        assert made[-1].closed
        return result

    return invoke, store, made


def test_cli_exits_0_and_prints_the_summary_when_everything_is_published(cli, files):
    invoke, store, made = cli
    result = invoke(files)
    assert result.exit_code == 0, result.output
    assert "published 3 of 3 files to terradapt.acquisitions (uploaded 3, already stored 0); unpublished 0" in (
        result.output
    )
    again = invoke(files)
    assert again.exit_code == 0 and "(uploaded 0, already stored 3)" in again.output
    assert made[1].ids() == made[0].ids() and len(store.puts) == 3


def test_cli_exits_1_and_lists_each_unpublished_file_with_its_reason(cli, files):
    invoke, _, _ = cli
    result = invoke(files, fail=None, INGEST__DEADLINE_S="0")
    assert result.exit_code == 1, result.output
    assert "published 0 of 3 files" in result.output and "unpublished 3" in result.output
    for path in files:
        assert f"unpublished {path}: not published: " in result.output
    assert "kafka unavailable" in result.output and "KafkaTimeoutError" in result.output


def test_cli_deadline_setting_takes_effect(cli, files):
    """The same two-failure outage: given up at once with a zero deadline, ridden out with a longer one."""
    invoke, _, made = cli
    short = invoke(files[:1], fail=2, INGEST__DEADLINE_S="0")
    assert short.exit_code == 1 and made[-1].calls == 1 and "retry" not in short.output
    long = invoke(files[:1], fail=2, INGEST__DEADLINE_S="600", INGEST__BACKOFF_INITIAL_S="0.01")
    assert long.exit_code == 0, long.output
    assert made[-1].calls == 3 and "retry 1 in" in long.output and "retry 2 in" in long.output
    assert "kafka unavailable (publish D033-" in long.output


def test_retry_event_is_a_plain_record():
    event = RetryEvent("kafka", "publish D033-x", 1, 0.5, "KafkaTimeoutError: t")
    assert event.service == "kafka" and ingest_module.kafka_transient(KafkaTimeoutError())
    assert not ingest_module.kafka_transient(MessageSizeTooLargeError()) and ingest_module.kafka_transient(
        ConnectionRefusedError()
    )
