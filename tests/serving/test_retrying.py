"""Storage outages are ridden out with backoff until a deadline; permanent errors pass through at once."""

from __future__ import annotations

import pytest
from urllib3.exceptions import MaxRetryError, NewConnectionError, SSLError

from serving.codec import StorageError
from serving.retrying import RetryingReader, RetryingStore, RetryPolicy, is_transient
from serving.store import MemoryReader, MemoryStore
from terradapt.errors import ObjectNotFoundError


class _Clock:
    """Virtual time: ``sleep`` advances it, so the tests never wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def __call__(self) -> float:
        return self.now


class _Flaky:
    """A store that is away for its first ``down`` calls."""

    def __init__(self, store: MemoryStore, down: int, exc: Exception) -> None:
        self.store, self.down, self.exc, self.calls = store, down, exc, 0

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls <= self.down:
                raise self.exc
            return method(*args, **kwargs)

        return call


def _outage() -> Exception:
    return MaxRetryError(None, "/acq/x", NewConnectionError(None, "Connection refused"))  # type: ignore[arg-type]


def test_an_outage_shorter_than_the_deadline_is_ridden_out_with_growing_waits():
    clock = _Clock()
    flaky = _Flaky(MemoryStore("acq"), down=6, exc=_outage())
    store = RetryingStore(flaky, RetryPolicy(deadline_s=60, sleep=clock.sleep, clock=clock))
    assert store.put("D033/a.tif", b"x").endswith("D033/a.tif")
    assert store.get("D033/a.tif") == b"x"
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_past_the_deadline_the_call_fails_with_a_typed_storage_error():
    clock = _Clock()
    flaky = _Flaky(MemoryStore("acq"), down=10**6, exc=ConnectionResetError())
    store = RetryingStore(flaky, RetryPolicy(deadline_s=5, sleep=clock.sleep, clock=clock))
    with pytest.raises(StorageError) as info:
        store.get("x")
    assert info.value.reason == "storage_unavailable"
    assert clock.now == pytest.approx(5.0)


def test_permanent_answers_are_not_retried():
    clock = _Clock()
    objects = MemoryStore("acq")
    reader = RetryingReader(MemoryReader(objects), RetryPolicy(deadline_s=60, sleep=clock.sleep, clock=clock))
    with pytest.raises(ObjectNotFoundError):
        reader.get("memory://acq/D033/missing.tif")
    assert clock.sleeps == []
    assert not is_transient(ValueError("bad"))
    assert is_transient(_outage()) and is_transient(TimeoutError())
    untrusted = MaxRetryError(None, "/acq/x", SSLError("CERTIFICATE_VERIFY_FAILED"))  # type: ignore[arg-type]
    assert not is_transient(untrusted)
