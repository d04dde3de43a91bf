"""Riding out object-store outages: transient failures are retried with backoff until a deadline.

A storage outage is not a bad input: a worker that dead-lettered every acquisition while MinIO restarts would turn
a 15-second outage into lost work. The stores and readers the workers build are wrapped here, so each call waits
(with exponential backoff, logging each retry) while the failure looks transient, and gives up with a typed
``StorageError`` (reason ``storage_unavailable``) only when the deadline passes. Permanent answers (a missing object,
a refused href, an oversized tile) pass through at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from serving.codec import StorageError
from serving.store import BlobStore, TileReader
from terradapt.errors import TerradaptError

log = logging.getLogger("terradapt.storage")
T = TypeVar("T")

#: S3 error codes a healthy retry can fix (a restarting or overloaded server).
TRANSIENT_S3_CODES = frozenset(
    {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "XMinioServerNotInitialized"}
)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage failure is worth retrying: connection trouble or a 5xx-style S3 answer."""
    if isinstance(exc, TerradaptError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        from urllib3.exceptions import HTTPError, MaxRetryError, SSLError
    except ImportError:  # pragma: no cover - urllib3 comes with minio
        return False
    if isinstance(exc, SSLError) or (isinstance(exc, MaxRetryError) and isinstance(exc.reason, SSLError)):
        return False  # a certificate the client does not trust stays untrusted: fail now, say why
    if isinstance(exc, HTTPError):
        return True
    try:
        from minio.error import S3Error
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, S3Error) and exc.code in TRANSIENT_S3_CODES


@dataclass(frozen=True)
class RetryEvent:
    """One retry about to happen: reported to ``on_retry`` (the ingest CLI prints it), else logged, before the sleep."""

    service: str
    what: str
    attempt: int
    delay_s: float
    error: str


def describe(exc: BaseException) -> str:
    """``Type: message`` (kafka-python's errors already hold their type name)."""
    text = str(exc)
    name = type(exc).__name__
    return text if name in text else f"{name}: {text}" if text else name


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with backoff until a deadline: the one retry loop of terradapt.

    Waits double from ``initial_s`` up to ``max_s`` (each shortened by up to ``jitter`` of itself) until
    ``deadline_s`` after the first failure of an outage; then ``give_up(message)`` is raised. Used by the workers'
    storage (``RetryingStore``/``RetryingReader``, giving up with a ``StorageError``) and by ``terradapt ingest``
    (Kafka and the object store).
    """

    deadline_s: float = 120.0
    initial_s: float = 0.5
    max_s: float = 10.0
    jitter: float = 0.0
    service: str = "storage"
    transient: Callable[[BaseException], bool] = is_transient
    give_up: Callable[[str], Exception] = StorageError
    on_retry: Callable[[RetryEvent], None] | None = field(default=None, repr=False)
    rng: random.Random = field(default_factory=random.Random, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried while it fails transiently and the outage is younger than the deadline.

        Raises:
            Exception: ``give_up(message)`` when still failing transiently at the deadline (the message says which
                service, for how long, how many attempts and the last error).

        """
        outage_start: float | None = None
        delay = self.initial_s
        attempt = 0
        while True:
            started = self.clock()
            try:
                return fn()
            except Exception as exc:
                if not self.transient(exc):
                    raise
                attempt += 1
                outage_start = started if outage_start is None else outage_start
                now = self.clock()
                left = outage_start + self.deadline_s - now
                error = describe(exc)
                if left <= 0:
                    raise self.give_up(
                        f"{self.service} unavailable for {now - outage_start:.1f} s, {attempt} attempt(s), "
                        f"deadline {self.deadline_s:g} s ({error})"
                    ) from exc
                wait = min(delay * (1 - self.jitter * self.rng.random()), left)
                event = RetryEvent(self.service, what, attempt, wait, error)
                if self.on_retry is not None:
                    self.on_retry(event)
                else:
                    log.warning("%s unavailable (%s): %s; retry %d in %.1f s", self.service, what, error, attempt, wait)
                self.sleep(wait)
                delay = min(delay * 2, self.max_s)


class RetryingStore:
    """A ``BlobStore`` whose calls ride out transient outages (``RetryPolicy``)."""

    def __init__(self, store: BlobStore, policy: RetryPolicy) -> None:
        self.store = store
        self.policy = policy

    def get(self, key: str) -> bytes:
        return self.policy.call(f"get {key}", lambda: self.store.get(key))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        return self.policy.call(f"put {key}", lambda: self.store.put(key, data, content_type))

    def exists(self, key: str) -> bool:
        return self.policy.call(f"exists {key}", lambda: self.store.exists(key))

    def list(self, prefix: str) -> list[str]:
        return self.policy.call(f"list {prefix}", lambda: self.store.list(prefix))

    def delete(self, key: str) -> None:
        self.policy.call(f"delete {key}", lambda: self.store.delete(key))

    def uri(self, key: str) -> str:
        return self.store.uri(key)


class RetryingReader:
    """A ``TileReader`` whose reads ride out transient outages."""

    def __init__(self, reader: TileReader, policy: RetryPolicy) -> None:
        self.reader = reader
        self.policy = policy

    def get(self, href: str) -> bytes:
        return self.policy.call(f"read {href}", lambda: self.reader.get(href))
