"""``terradapt worker``: the faust stream worker.

Consumes acquisitions (STAC items keyed by region), reads each object, predicts with the region's current model,
writes the prediction COG, publishes predictions and features, updates the region's drift monitor, and publishes
drift events and adaptation jobs. Everything but the bookkeeping runs in a worker thread (``run_in_executor``):
a blocked event loop stops offset commits and triggers rebalances.

Per-region state lives in changelog-backed faust tables keyed by region (the message key), so it survives
restarts and rebalances: the monitor (its ``state_dict``), the trigger's counters and the recent tile ids.
Delivery is at-least-once; outputs are idempotent (the prediction object key is the acquisition id, the job id
is derived from the acquisition id), so a replay after a crash rewrites the same objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import faust

from adapters.trigger import Trigger
from monitoring.monitor import RegionMonitor
from stream.kafka.services import Services
from stream.pipeline import Predicted
from terradapt.errors import InvalidPayloadError, TerradaptError
from terradapt.records import Acquisition, DeadLetter, Record, Stage

log = logging.getLogger("terradapt.worker")
T = TypeVar("T")


@dataclass
class Outgoing:
    """A record to publish: topic attribute name on Topics, key, record."""

    topic: str
    key: str
    record: Record


def dead_letter(topic: str, stage: Stage, reason: str, error: str, payload: bytes, key: str | None) -> Outgoing:
    """The dead letter of a payload read from ``topic``, with its reason and the original bytes."""
    letter = DeadLetter(
        topic=topic,
        reason=reason,
        error=error,
        payload=payload.decode("utf-8", errors="replace"),
        key=key,
        stage=stage,
    )
    return Outgoing("deadletter", key or "unknown", letter)


class Offload(Protocol):
    """Runs a blocking function off the event loop and awaits its result."""

    def __call__(self, fn: Callable[[], T]) -> Awaitable[T]: ...


Handle = Callable[[bytes | None, bytes], Awaitable[list[Outgoing]]]
Dead = Callable[[str, str, bytes, str | None], Outgoing]


class RetryableError(Exception):
    """A transient failure (predictor unreachable): retried with backoff, then dead-lettered."""


class AcquisitionHandler:
    """The body of the acquisitions agent, independent of faust (tested with plain dicts as tables)."""

    def __init__(
        self,
        services: Services,
        run: Offload,
        monitors: Any,
        triggers: Any,
        recent: Any,
    ) -> None:
        self.s = services
        self.run = run
        self.monitors = monitors
        self.triggers = triggers
        self.recent = recent

    def dead(self, reason: str, error: str, payload: bytes, key: str | None) -> Outgoing:
        """The dead letter of an acquisition payload, with its reason and the original bytes."""
        return dead_letter(self.s.topics.acquisitions, "predict", reason, error, payload, key)

    async def _predict(self, acq: Acquisition, data: bytes) -> Predicted:
        pipeline = self.s.pipeline
        raster = await self.run(lambda: pipeline.read(acq, data))
        attempts = self.s.settings.stream.predict_retries + 1
        for attempt in range(attempts):
            try:
                return await self.run(lambda: pipeline.predict(acq, raster))
            except (ConnectionError, TimeoutError, OSError) as exc:
                if attempt == attempts - 1:
                    raise RetryableError(f"prediction failed after {attempts} tries: {exc}") from exc
                await asyncio.sleep(min(2.0**attempt * 0.5, 10.0))
        raise AssertionError("unreachable")  # pragma: no cover

    async def handle(self, key: bytes | None, value: bytes) -> list[Outgoing]:
        """Process one acquisition message; return what to publish (dead letters included)."""
        skey = key.decode("utf-8", errors="replace") if key else None
        t0 = time.perf_counter()
        pipeline = self.s.pipeline
        try:
            acq = Acquisition.from_stac(value)
        except InvalidPayloadError as exc:
            pipeline.rejected(None, exc, t0)
            return [self.dead(exc.reason, str(exc), value, skey)]
        try:
            pipeline.check_region(acq.region)
            data = await self.run(lambda: self.s.reader.get(acq.href))
            predicted = await self._predict(acq, data)
        except TerradaptError as exc:
            pipeline.rejected(acq.region if exc.reason != "unknown_region" else None, exc, t0)
            return [self.dead(exc.reason, str(exc), value, skey)]
        except RetryableError as exc:
            pipeline.rejected(acq.region, "predictor_unavailable", t0)
            return [self.dead("predictor_unavailable", str(exc), value, skey)]
        region = acq.region
        out = [
            Outgoing("predictions", region, predicted.prediction),
            Outgoing("features", region, predicted.features),
        ]
        monitor = self._monitor(region)
        trigger = Trigger(self.s.settings.trigger)
        if region in self.triggers:
            trigger.load_state_dict(json.loads(self.triggers[region]))
        recent = [tuple(x) for x in json.loads(self.recent[region])] if region in self.recent else []
        recent = [r for r in recent if r[0] != acq.id] + [(acq.id, acq.href)]
        recent = recent[-self.s.settings.stream.buffer_tiles :]
        observed = self.s.pipeline.observe(acq, predicted.features, monitor, trigger, recent)
        self.monitors[region] = json.dumps(monitor.state_dict()).encode()
        self.triggers[region] = json.dumps(trigger.state_dict()).encode()
        self.recent[region] = json.dumps(recent).encode()
        if observed.update.newly_detected and observed.drift is not None:
            out.append(Outgoing("drift_events", region, observed.drift))
        if observed.job is not None:
            out.append(Outgoing("adaptation_jobs", region, observed.job))
        pipeline.done(region, t0)
        return out

    def _monitor(self, region: str) -> RegionMonitor:
        if region in self.monitors:
            monitor = RegionMonitor()
            monitor.load_state_dict(json.loads(self.monitors[region]))
            return monitor
        return self.s.pipeline.new_monitor()


def create_app(services: Services) -> faust.App:
    """The faust app of the stream worker (no module-level app: each call builds a fresh one)."""
    settings = services.settings
    app = faust.App(
        f"{settings.stream.app_id}-worker",
        broker=f"kafka://{settings.kafka.bootstrap}",
        store="memory://",
        topic_partitions=settings.kafka.partitions,
        topic_allow_declare=True,
        topic_disable_leader=True,
        web_enabled=False,
        processing_guarantee="at_least_once",
        broker_commit_every=1,
        broker_session_timeout=settings.kafka.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka.session_timeout_s / 3),
        producer_acks=-1,
        key_serializer="raw",
        value_serializer="raw",
    )
    topics = services.topics
    src = app.topic(topics.acquisitions, key_type=bytes, value_type=bytes, partitions=settings.kafka.partitions)
    sinks = {
        name: app.topic(getattr(topics, name), key_type=bytes, value_type=bytes)
        for name in ("predictions", "features", "drift_events", "adaptation_jobs", "deadletter")
    }
    tables = {
        name: app.Table(name, default=None, key_type=str, value_type=bytes, partitions=settings.kafka.partitions)
        for name in ("monitors", "triggers", "recent", "accuracy")
    }
    labels_src = app.topic(topics.labels, key_type=bytes, value_type=bytes, partitions=settings.kafka.partitions)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="terradapt-compute")

    async def run(fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn)

    handler = AcquisitionHandler(services, run, tables["monitors"], tables["triggers"], tables["recent"])

    async def drain(stream: faust.StreamT[bytes], handle: Handle, dead: Dead, what: str) -> None:
        async for event in stream.events():
            key, value = event.message.key, event.message.value
            try:
                outgoing = await handle(key, value)
            except Exception as exc:  # never lose a message to a bug: dead-letter it with the error
                log.exception("unexpected error on %s %s", what, key)
                outgoing = [dead("internal_error", repr(exc), value, key.decode() if key else None)]
            for out in outgoing:
                await sinks[out.topic].send(key=out.key.encode(), value=out.record.to_json())
            log.info("processed %s %s", what, key)

    @app.agent(src)
    async def acquisitions(stream: faust.StreamT[bytes]) -> None:
        await drain(stream, handler.handle, handler.dead, "acquisition")

    from stream.kafka.labels import LabelHandler

    num_classes = len(services.pipeline.registry.manifest("source", 0).classes)
    label_handler = LabelHandler(services, run, tables["accuracy"], num_classes)

    @app.agent(labels_src)
    async def labels(stream: faust.StreamT[bytes]) -> None:
        await drain(stream, label_handler.handle, label_handler.dead, "label")

    app.handler = handler  # type: ignore[attr-defined]
    return app
