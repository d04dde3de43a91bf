"""``terradapt worker``: the faust stream worker. Its agents move messages and store state; the pipeline does the rest.

Two agents, one loop: acquisitions go to ``Pipeline.process_many`` in batches (the messages waiting, up to
``stream.batch_max_tiles``, gathered for at most ``stream.batch_wait_ms``: one region's tiles share forward passes),
delayed labels to ``Pipeline.process_label`` one by one; each call runs in a worker thread (``run_in_executor``: a
blocked event loop stops offset commits and triggers rebalances) with the region's stored state, and the agent
stores the state the call returns and publishes its records. Messages are keyed by region, so a region's state
lives in the table partition its messages arrive on, survives restarts and moves with the partition on a rebalance
(changelog-backed tables).

Delivery is at-least-once; outputs are idempotent (the prediction object key is the acquisition id, the job id is
derived from the acquisition id). A region's stored state carries the partition offset of the last message it
includes, and an agent stores it after queueing that message's records on the same producer: a replay after a
crash (offsets are committed well behind processing) of a message the state already includes is skipped, so the
monitor counts every acquisition once however long the replay is.
(The pipeline's own guard, ``RegionState.seen``, only spans the last ``buffer_tiles`` acquisitions.)
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import faust
import faust.streams as faust_streams
from faust.streams import Stream

from stream.kafka.security import faust_credentials
from stream.kafka.services import Services
from stream.outcome import Outcome

log = logging.getLogger("terradapt.worker")

#: [(payload, key, stored state)] -> one outcome each: ``Pipeline.process_many``, or ``process_label`` per item.
Step = Callable[[list[tuple[bytes, str | None, bytes | None]]], list[Outcome]]


@dataclass(frozen=True)
class Batching:
    """How many waiting messages an agent hands to its step at once, and how long it waits for them."""

    max_messages: int = 1
    wait_s: float = 0.0


async def _batches(stream: faust.StreamT[bytes], batch: Batching) -> AsyncIterator[list[Any]]:
    """The stream's events in lists of up to ``batch.max_messages`` (one by one when that is 1).

    A list is handed over when it is full or ``batch.wait_s`` after the agent started waiting, whichever is first;
    faust acknowledges its events once the list has been processed.
    """
    if batch.max_messages == 1:
        async for event in stream.events():
            yield [event]
        return
    events_of = cast("Stream[bytes]", stream).take_events  # the agent's stream is a faust Stream (StreamT lacks it)
    async for events in events_of(batch.max_messages, within=max(batch.wait_s, 0.001)):
        yield list(events)


def _make_current(event: Any) -> None:
    """Make ``event`` the current event of this task: a table write goes to the changelog partition of it.

    faust sets it for an agent iterating single events; one iterating a batch sets it per message before storing
    that message's state. Only this task's context variable is set (``Stream.current_event``, which faust's batch
    buffer reads in another task, is left alone).
    """
    faust_streams._current_event.set(weakref.ref(event))


_STORED = b"TDS1"  # a table value: this marker, the partition and offset of the message that made it, the state
_POSITION = struct.Struct(">iq")


@dataclass(frozen=True)
class StoredState:
    """A region's state as a table stores it: the pipeline's bytes and the input message they include."""

    state: bytes
    partition: int | None = None
    offset: int | None = None

    def covers(self, partition: int, offset: int) -> bool:
        """Whether the message at (partition, offset) is already part of this state (a replay)."""
        return self.partition == partition and self.offset is not None and offset <= self.offset


def pack_state(partition: int, offset: int, state: bytes) -> bytes:
    """The table value of ``state`` made by the message at (partition, offset)."""
    return _STORED + _POSITION.pack(partition, offset) + state


def unpack_state(value: bytes) -> StoredState:
    """Inverse of ``pack_state``; a value stored without a position (an older worker) is taken as it is."""
    if not value.startswith(_STORED):
        return StoredState(value)
    partition, offset = _POSITION.unpack_from(value, len(_STORED))
    return StoredState(value[len(_STORED) + _POSITION.size :], partition, offset)


def create_app(services: Services) -> faust.App:
    """The faust app of the stream worker (no module-level app: each call builds a fresh one)."""
    settings = services.settings
    pipeline = services.pipeline
    app = faust.App(
        f"{settings.stream.app_id}-worker",
        broker=f"kafka://{settings.kafka.bootstrap}",
        broker_credentials=faust_credentials(settings.kafka),
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
    partitions = settings.kafka.partitions
    sinks = {
        name: app.topic(topics.name(name), key_type=bytes, value_type=bytes)
        for name in ("predictions", "features", "drift_events", "adaptation_jobs", "deadletter")
    }
    # "monitors" holds RegionState bytes, "accuracy" the delayed-label tracker of each region (``pack_state``d)
    states = app.Table("monitors", default=None, key_type=str, value_type=bytes, partitions=partitions)
    accuracy = app.Table("accuracy", default=None, key_type=str, value_type=bytes, partitions=partitions)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="terradapt-compute")

    progress = _Progress()

    async def drain(stream: faust.StreamT[bytes], step: Step, table: Any, what: str, batch: Batching) -> None:
        loop = asyncio.get_running_loop()
        async for events in _batches(stream, batch):
            todo: list[tuple[Any, str | None, bytes | None]] = []  # (event, key, state): not yet in the state
            for event in events:
                message = event.message
                progress.seen(message.tp, message.offset)
                key = message.key.decode("utf-8", errors="replace") if message.key else None
                stored = unpack_state(table[key]) if key is not None and key in table else None
                if stored is not None and stored.covers(message.partition, message.offset):
                    log.info("skipped replayed %s %s (offset %s)", what, key, message.offset)
                    continue
                todo.append((event, key, None if stored is None else stored.state))
            if not todo:
                continue
            items = [(event.message.value, key, state) for event, key, state in todo]
            progress.busy += 1
            try:
                outcomes = await loop.run_in_executor(executor, step, items)
            finally:
                progress.busy -= 1
            if len(todo) > 1:
                log.info("processed a batch of %d %ss", len(todo), what)
            for (event, key, _), outcome in zip(todo, outcomes, strict=True):
                message = event.message
                _make_current(event)
                # records first, the state after, through the same producer: the state's changelog record is
                # queued behind them. (Awaiting each delivery here stalled a worker after a rebalance under load:
                # the agent stopped consuming, so deliveries are not awaited inside the agent.)
                for out in outcome.messages:
                    await sinks[out.topic].send(key=out.key.encode(), value=out.record.to_json())
                if outcome.state is not None and key is not None:
                    table[key] = pack_state(message.partition, message.offset, outcome.state)
                log.info("processed %s %s", what, key)
                progress.seen(message.tp, message.offset)

    acquisition_batches = Batching(settings.stream.batch_max_tiles, settings.stream.batch_wait_ms / 1000.0)

    @app.agent(app.topic(topics.acquisitions, key_type=bytes, value_type=bytes, partitions=partitions))
    async def acquisitions(stream: faust.StreamT[bytes]) -> None:
        await drain(stream, pipeline.process_many, states, "acquisition", acquisition_batches)

    @app.agent(app.topic(topics.labels, key_type=bytes, value_type=bytes, partitions=partitions))
    async def labels(stream: faust.StreamT[bytes]) -> None:
        await drain(stream, lambda items: [pipeline.process_label(*i) for i in items], accuracy, "label", Batching())

    watched = {topics.acquisitions, topics.labels}

    @app.timer(interval=STALL_CHECK_S)  # type: ignore[untyped-decorator]  # faust's timer is untyped
    async def stall_guard() -> None:
        """Re-seek a partition that has messages waiting but is no longer fetched (faust-streaming #629).

        After some rebalances under load a partition can stay assigned yet never be fetched again: its pending
        acquisitions would wait until the next restart. When nothing was consumed for a whole check interval and
        a watched partition's end offset is past what this worker consumed, the partition is sought back to the
        next offset (a replay of a message the stored state already includes is skipped by ``drain``).
        """
        if app.rebalancing or app.in_recovery or not progress.idle(STALL_CHECK_S):
            return
        consumer = app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic in watched and tp in progress.offsets]
        if not tps:
            return
        ends = await consumer.highwaters(*tps)
        for tp in tps:
            nxt = progress.offsets[tp] + 1
            if ends.get(tp, 0) > nxt:
                log.warning("partition %s stalled at offset %s (end %s): resuming it from there", tp, nxt, ends[tp])
                # faust fetches only its "active" partitions; one left out of that set after a rebalance is never
                # fetched again: put it back, and re-fetch from the next offset (records of it dropped meanwhile)
                consumer.resume_partitions({tp})
                await consumer.seek(tp, nxt)
                progress.seen(tp, nxt - 1)

    return app


#: seconds without consuming anything before the stall guard checks the watched partitions
STALL_CHECK_S = 15.0


class _Progress:
    """The last offset consumed per partition and when the worker last consumed anything (the stall guard's view)."""

    def __init__(self) -> None:
        self.offsets: dict[Any, int] = {}
        self.last = time.monotonic()
        self.busy = 0  # messages being processed (a long tile is not a stall)

    def seen(self, tp: Any, offset: int) -> None:
        self.offsets[tp] = max(offset, self.offsets.get(tp, -1))
        self.last = time.monotonic()

    def idle(self, seconds: float) -> bool:
        return self.busy == 0 and time.monotonic() - self.last >= seconds
