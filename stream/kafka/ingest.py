"""``terradapt ingest``: upload GeoTIFF acquisitions to object storage and announce them as STAC items on Kafka.

The acquisition id is derived from the region and the file's sha256, so ingesting the same file twice gives the
same id and the same object key. Messages are keyed by region (a region's tiles stay in order on one partition)
and sent with acks=all from an idempotent producer.

A run survives outages: each call to the object store or the broker is retried with exponential backoff and
jitter while its failure looks transient, bounded by ``IngestConfig.deadline_s`` from the outage's first failure.
When the deadline passes the service counts as down for the rest of the run (no more waiting per file) and the
files it was needed for are reported unpublished with the reason. Re-running is safe and cheap: an object already
stored under its key with the same sha256 is not uploaded again, and the same acquisition id is published again
(at least once; the stream worker is idempotent per id). A key holding different content is reported, never
silently skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from serving.retrying import RetryEvent, RetryPolicy, describe
from serving.retrying import is_transient as store_transient
from serving.store import BlobStore, ChecksummedStore
from stream.config import IngestConfig
from stream.kafka.security import client_options
from terradapt.capture_time import CaptureTime, CaptureTimes, tiff_datetime
from terradapt.errors import UnknownCaptureTimeError
from terradapt.records import Acquisition, check_region
from terradapt.settings import KafkaConfig

log = logging.getLogger("terradapt.ingest")
T = TypeVar("T")
Stored = Literal["uploaded", "already-stored"]


@dataclass(frozen=True)
class _Header:
    """What the GeoTIFF header tells about a tile's grid."""

    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    crs: str | None = None
    bands: tuple[str, ...] = ()
    shape: tuple[int, int] | None = None
    transform: tuple[float, float, float, float, float, float] | None = None


def _header(data: bytes) -> _Header:
    """Bounds, CRS, band names, shape and transform from the GeoTIFF header.

    Unreadable files still get ingested: the worker dead-letters them with the reason, so nothing disappears at
    the edge.
    """
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as mem, mem.open() as src:
            b = src.bounds
            names = tuple(d or f"band{i + 1}" for i, d in enumerate(src.descriptions))
            t = src.transform
            return _Header(
                (b.left, b.bottom, b.right, b.top),
                src.crs.to_string() if src.crs else None,
                names,
                (int(src.height), int(src.width)),
                (t.a, t.b, t.c, t.d, t.e, t.f),
            )
    except (RasterioError, ValueError):
        return _Header()


def acquisition_for(data: bytes, region: str, href: str, when: datetime | CaptureTime | None = None) -> Acquisition:
    """The STAC item of one file (id = region + content hash).

    ``when`` is the capture time (or the campaign bounding an unknown one); by default the file's
    ``TIFFTAG_DATETIME``, else unknown (``datetime`` None): never the time of ingest.
    """
    sha = hashlib.sha256(data).hexdigest()
    header = _header(data)
    if when is None:
        tagged = tiff_datetime(data)
        when = CaptureTime(datetime=tagged, source="tiff-tag" if tagged else "unknown")
    elif isinstance(when, datetime):
        when = CaptureTime(datetime=when, source="option")
    return Acquisition(
        id=f"{region}-{sha[:20]}",
        region=region,
        datetime=when.datetime,
        start_datetime=when.start if when.datetime is None else None,
        end_datetime=when.end if when.datetime is None else None,
        bbox=header.bbox,
        crs=header.crs,
        bands=header.bands or ("red", "green", "blue", "nir", "elevation"),
        href=href,
        sha256=sha,
        shape=header.shape,
        transform=header.transform,
    )


def object_key(region: str, sha256: str) -> str:
    """Where a file's bytes are stored: ``{region}/{acquisition id}.tif``."""
    return f"{region}/{region}-{sha256[:20]}.tif"


def make_producer(config: KafkaConfig) -> KafkaProducer:
    """Idempotent, acks=all producer (kafka-python 3.x) with the configured TLS/SASL options."""
    return KafkaProducer(
        **client_options(config),
        acks="all",
        enable_idempotence=True,
        retries=5,
        linger_ms=5,
        client_id="terradapt-ingest",
    )


def make_ingest_producer(config: KafkaConfig, timeout_s: float) -> KafkaProducer:
    """The ingest's producer: like ``make_producer``, but no call blocks longer than ``timeout_s``.

    kafka-python bootstraps in the constructor (``bootstrap_timeout_ms``, 30 s by default) and ``send`` waits for
    topic metadata (``max_block_ms``, 60 s): both are bounded here so the ingest's deadline holds. Retries inside
    the producer are bounded by ``delivery_timeout_ms`` (its default), not by a count.
    """
    ms = max(1, int(timeout_s * 1000))
    return KafkaProducer(
        **client_options(config),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        client_id="terradapt-ingest",
        bootstrap_timeout_ms=ms,
        max_block_ms=ms,
    )


# -- publishing ---------------------------------------------------------------------------------------------------
class Publisher(Protocol):
    """Sends one record and waits until the broker acknowledges it."""

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Return once acknowledged; raise (a retriable ``KafkaError`` for an unreachable broker) otherwise."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


def kafka_transient(exc: BaseException) -> bool:
    """Whether a publishing failure is worth retrying: a retriable Kafka error or connection trouble."""
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    return isinstance(exc, (ConnectionError, TimeoutError))


class KafkaPublisher:
    """A ``Publisher`` over kafka-python that builds its producer on first use (the broker may be away then).

    A retry of the record still in flight waits for that record instead of sending a second copy, so an outage
    does not duplicate messages (a record whose delivery failed is sent again).
    """

    def __init__(self, factory: Callable[[], KafkaProducer], timeout_s: float, *, owned: bool = True) -> None:
        self._factory = factory
        self.timeout_s = timeout_s
        self._owned = owned
        self._producer: KafkaProducer | None = None
        self._pending: tuple[tuple[str, bytes, bytes], FutureRecordMetadata] | None = None

    @classmethod
    def from_settings(cls, kafka: KafkaConfig, config: IngestConfig) -> KafkaPublisher:
        """A publisher whose attempts are bounded by ``config.attempt_timeout_s``."""
        return cls(lambda: make_ingest_producer(kafka, config.attempt_timeout_s), config.attempt_timeout_s)

    @classmethod
    def using(cls, producer: KafkaProducer, timeout_s: float = 30.0) -> KafkaPublisher:
        """A publisher over an existing producer, which the caller keeps (and closes)."""
        return cls(lambda: producer, timeout_s, owned=False)

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        if self._producer is None:
            self._producer = self._factory()  # KafkaTimeoutError (retriable) while the broker is away
        record = (topic, key, value)
        future: FutureRecordMetadata | None = None
        if self._pending is not None and self._pending[0] == record:
            future = self._pending[1]
            if future.is_done and future.failed():
                future = None  # delivery failed for good: send it again
        if future is None:
            self._pending = None
            # may wait for topic metadata (max_block_ms) and raise before the record is accepted
            future = self._producer.send(topic, key=key, value=value)
            self._pending = (record, future)
        future.get(timeout=self.timeout_s)  # KafkaTimeoutError while unacknowledged: the record stays queued
        self._pending = None

    def close(self) -> None:
        if self._producer is None or not self._owned:
            return
        try:
            # a record given up on is still queued: do not wait for it (kafka-python's close flushes first and
            # raises). Should the broker return before the process ends, it may still be delivered: at least once,
            # as the report's "unpublished" only promises that a re-run publishes it.
            self._producer.close(timeout=0 if self._pending is not None else self.timeout_s)
        except KafkaError as exc:
            log.warning("ingest producer closed with records unacknowledged: %s", exc)
        self._producer = None


# -- retries ------------------------------------------------------------------------------------------------------
class ServiceDownError(Exception):
    """A service stayed unavailable past the deadline (or already had in this run): the reason says which."""


@dataclass
class _Retrier:
    """Calls to one service under a ``RetryPolicy``, remembering an outage that outlasted the deadline.

    The service then counts as down for the rest of the run: later files are reported at once instead of waiting.
    """

    policy: RetryPolicy
    down: str | None = field(default=None)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` under the policy; ``ServiceDownError`` past the deadline or once the service is down."""
        if self.down is not None:
            raise ServiceDownError(f"not attempted: {self.down}")
        try:
            return self.policy.call(what, fn)
        except ServiceDownError as exc:
            self.down = str(exc)
            raise


# -- the run ------------------------------------------------------------------------------------------------------
class ObjectConflictError(ValueError):
    """The object key already holds different content (never overwritten, never silently skipped)."""


@dataclass(frozen=True)
class FileResult:
    """What happened to one file: stored how, published or not, and why not."""

    path: Path
    acquisition: Acquisition | None  # None when the file could not be read or stored
    stored: Stored | None  # None: not in the store (unreadable, conflict, store down)
    published: bool
    reason: str | None = None  # why it stayed unpublished


@dataclass(frozen=True)
class IngestReport:
    """Per-file outcomes of one run, in input order."""

    topic: str
    files: tuple[FileResult, ...]

    @property
    def published(self) -> tuple[FileResult, ...]:
        return tuple(f for f in self.files if f.published)

    @property
    def unpublished(self) -> tuple[FileResult, ...]:
        return tuple(f for f in self.files if not f.published)

    @property
    def uploaded(self) -> tuple[FileResult, ...]:
        return tuple(f for f in self.files if f.stored == "uploaded")

    @property
    def already_stored(self) -> tuple[FileResult, ...]:
        """Files whose object was already stored with the same sha256 (not uploaded again)."""
        return tuple(f for f in self.files if f.stored == "already-stored")

    @property
    def acquisitions(self) -> list[Acquisition]:
        """The published acquisitions, in input order."""
        return [f.acquisition for f in self.files if f.published and f.acquisition is not None]

    @property
    def ok(self) -> bool:
        """Everything was published."""
        return not self.unpublished

    def summary(self) -> str:
        """Counts, then one line per unpublished file with its reason."""
        lines = [
            f"published {len(self.published)} of {len(self.files)} files to {self.topic} "
            f"(uploaded {len(self.uploaded)}, already stored {len(self.already_stored)}); "
            f"unpublished {len(self.unpublished)}"
        ]
        lines += [f"  unpublished {f.path}: {f.reason}" for f in self.unpublished]
        return "\n".join(lines)


def _store_object(store: BlobStore, key: str, data: bytes, sha: str) -> Stored:
    """Upload unless ``key`` already holds these bytes; refuse a key holding other bytes."""
    if isinstance(store, ChecksummedStore):
        info = store.stat(key)
        if info is None:
            store.put_with_sha256(key, data, sha, "image/tiff")
            return "uploaded"
        if info.sha256 is not None:
            if info.sha256 == sha and info.size == len(data):
                return "already-stored"
            raise ObjectConflictError(f"{store.uri(key)} holds other content (sha256 {info.sha256}, not {sha})")
    elif not store.exists(key):
        store.put(key, data, "image/tiff")
        return "uploaded"
    held = hashlib.sha256(store.get(key)).hexdigest()  # stored without a checksum: compare the bytes
    if held != sha:
        raise ObjectConflictError(f"{store.uri(key)} holds other content (sha256 {held}, not {sha})")
    return "already-stored"


def ingest(
    paths: Iterable[Path],
    region: str,
    store: BlobStore,
    publisher: Publisher | KafkaProducer,
    topic: str,
    on_file: Callable[[FileResult], None] | None = None,
    *,
    config: IngestConfig | None = None,
    on_retry: Callable[[RetryEvent], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    times: CaptureTimes | None = None,
) -> IngestReport:
    """Upload every file (unless already stored) and publish its acquisition; report each file's outcome.

    Args:
        paths: GeoTIFF files, ingested in this order.
        region: Region code (checked), the message key.
        store: Where objects go; when it is also a ``ChecksummedStore`` (MinIO) the sha256 is kept beside each
            object, else the stored bytes are read back to compare.
        publisher: A ``Publisher`` (``KafkaPublisher``) or a kafka-python producer the caller keeps.
        topic: The acquisitions topic.
        on_file: Called with each file's result as soon as it is known.
        config: Deadline and backoff (defaults: ``IngestConfig()``).
        on_retry: Called before each backoff sleep (else the retry is logged as a warning).
        clock: Monotonic seconds (injectable for tests).
        sleep: Sleeps the backoff (injectable for tests).
        rng: Jitter source (seed it for reproducible delays).
        times: Where capture times come from (default: FLAIR metadata beside the tiles, else the TIFF tag, else
            unknown); with ``times.require`` a file nothing dates is reported unpublished, not uploaded.

    Returns:
        The report; ``report.ok`` is False when a file stayed unpublished.

    """
    check_region(region)
    cfg = config or IngestConfig()
    pub = KafkaPublisher.using(publisher) if isinstance(publisher, KafkaProducer) else publisher
    jitter = rng or random.Random()
    policy = RetryPolicy(
        deadline_s=cfg.deadline_s,
        initial_s=cfg.backoff_initial_s,
        max_s=cfg.backoff_max_s,
        jitter=cfg.jitter,
        give_up=ServiceDownError,
        on_retry=on_retry,
        rng=jitter,
        sleep=sleep,
        clock=clock,
    )
    stores = _Retrier(dataclasses.replace(policy, service="store", transient=store_transient))
    kafka = _Retrier(dataclasses.replace(policy, service="kafka", transient=kafka_transient))
    dating = times or CaptureTimes()
    results = []
    for path in paths:
        result = _ingest_one(Path(path), region, store, pub, topic, stores, kafka, dating)
        results.append(result)
        if on_file is not None:
            on_file(result)
    return IngestReport(topic, tuple(results))


def _ingest_one(
    path: Path,
    region: str,
    store: BlobStore,
    publisher: Publisher,
    topic: str,
    stores: _Retrier,
    kafka: _Retrier,
    times: CaptureTimes,
) -> FileResult:
    try:
        data = path.read_bytes()
        when = times.resolve(path, data)
    except OSError as exc:
        return FileResult(path, None, None, False, f"unreadable: {exc}")
    except (UnknownCaptureTimeError, ValueError) as exc:  # ValueError: a FLAIR metadata file that does not parse
        return FileResult(path, None, None, False, str(exc))
    sha = hashlib.sha256(data).hexdigest()
    key = object_key(region, sha)
    try:
        stored = stores.call(f"upload {key}", lambda: _store_object(store, key, data, sha))
    except Exception as exc:  # any store failure is this file's outcome; the run goes on with the next file
        return FileResult(path, None, None, False, f"not uploaded: {_reason(exc)}")
    acq = acquisition_for(data, region, store.uri(key), when)
    try:
        kafka.call(f"publish {acq.id}", lambda: publisher.publish(topic, region.encode(), acq.to_json()))
    except Exception as exc:  # idem: reported, and a re-run publishes it
        return FileResult(path, acq, stored, False, f"not published: {_reason(exc)}")
    return FileResult(path, acq, stored, True)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ServiceDownError, ObjectConflictError)) else describe(exc)
