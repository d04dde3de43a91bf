"""``terradapt worker``: the faust stream worker. Its agents move messages and store state; the pipeline does the rest.

Two agents, one loop: acquisitions go to ``Pipeline.process_many`` in batches (the messages waiting, up to
``stream.batch_max_tiles``, gathered for at most ``stream.batch_wait_ms``: one region's tiles share forward passes),
delayed labels to ``Pipeline.process_label`` one by one; each call runs in a worker thread (``run_in_executor``: a
blocked event loop stops offset commits and triggers rebalances) with the region's stored state, and the agent
stores the state the call returns and publishes its records. Messages are keyed by region, so a region's state
lives in the table partition its messages arrive on, survives restarts and moves with the partition on a rebalance
(changelog-backed tables).

``terradapt crops worker`` is the same app (``worker_app``) with the crop loop's routes: parcel series to
``CropSteps.process_many`` (up to ``crops.batch_parcels`` per step), crop labels to ``CropSteps.process_label``, in
a consumer group and tables of its own (``<stream.app_id>-crops-worker``).

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
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast, get_args

import faust
import faust.streams as faust_streams
from faust.streams import Stream

from stream.kafka.security import faust_credentials
from stream.kafka.services import CropServices, Services
from stream.outcome import Outcome
from stream.topics import TopicName

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
_COMPACT = b"TDS2"  # the same with the state zlib-compressed (what ``pack_state`` writes)
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
    """The table value of ``state`` made by the message at (partition, offset): compact (the JSON state deflated).

    A region's monitor state is ~4.8 kB of JSON, ~1.5 kB deflated: what the changelog topic carries per message.
    """
    return _COMPACT + _POSITION.pack(partition, offset) + zlib.compress(state, 1)


def unpack_state(value: bytes) -> StoredState:
    """Inverse of ``pack_state``; values of older workers (uncompressed, or stored without a position) are read too.

    A compact value that does not inflate (a corrupt changelog record) is handed over as it is: the pipeline treats
    state bytes it cannot read as unreadable (logged, the region starts again from a fresh monitor).
    """
    head = len(_STORED) + _POSITION.size
    if value.startswith(_COMPACT):
        partition, offset = _POSITION.unpack_from(value, len(_COMPACT))
        try:
            return StoredState(zlib.decompress(value[head:]), partition, offset)
        except zlib.error:
            return StoredState(value[head:], partition, offset)
    if value.startswith(_STORED):
        partition, offset = _POSITION.unpack_from(value, len(_STORED))
        return StoredState(value[head:], partition, offset)
    return StoredState(value)


@dataclass(frozen=True)
class Route:
    """One agent of a worker: its input topic, the call its messages go to, the table of each region's state."""

    topic: str
    step: Step
    table: str
    what: str
    batching: Batching = Batching()


def create_app(services: Services) -> faust.App:
    """The faust app of the stream worker (no module-level app: each call builds a fresh one)."""
    settings, pipeline, topics = services.settings, services.pipeline, services.topics
    batching = Batching(settings.stream.batch_max_tiles, settings.stream.batch_wait_ms / 1000.0)
    # "monitors" holds RegionState bytes, "accuracy" the delayed-label tracker of each region (``pack_state``d)
    return worker_app(
        services,
        "worker",
        [
            Route(topics.acquisitions, pipeline.process_many, "monitors", "acquisition", batching),
            Route(topics.labels, lambda items: [pipeline.process_label(*i) for i in items], "accuracy", "label"),
        ],
    )


def create_crop_app(services: CropServices) -> faust.App:
    """The faust app of the crop worker: parcel series and their delayed labels (its own group and tables)."""
    return worker_app(services, "crops-worker", crop_routes(services))


def crop_routes(services: CropServices) -> list[Route]:
    """The crop worker's agents: up to ``crops.batch_parcels`` waiting series per step, labels one by one."""
    settings, steps, topics = services.settings, services.steps, services.topics
    batching = Batching(settings.crops.batch_parcels, settings.stream.batch_wait_ms / 1000.0)
    return [
        Route(topics.crop_series, steps.process_many, "monitors", "series item", batching),
        Route(topics.crop_labels, lambda items: [steps.process_label(*i) for i in items], "accuracy", "crop label"),
    ]


def worker_app(services: Services | CropServices, name: str, routes: list[Route]) -> faust.App:
    """A faust app ``<stream.app_id>-<name>`` with one agent per route, each storing its regions' states in a table."""
    settings = services.settings
    faust_dir = settings.runtime.workdir / "faust"
    faust_dir.mkdir(parents=True, exist_ok=True)  # faust makes its app's folder in it, not the parents
    app = faust.App(
        f"{settings.stream.app_id}-{name}",
        broker=f"kafka://{settings.kafka.bootstrap}",
        broker_credentials=faust_credentials(settings.kafka),
        store="memory://",
        datadir=str(faust_dir / "{conf.name}"),  # not the working folder
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
        logical: app.topic(topics.name(logical), key_type=bytes, value_type=bytes)
        for logical in cast("tuple[TopicName, ...]", get_args(TopicName))
    }
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
            started = time.time()
            try:
                outcomes = await loop.run_in_executor(executor, step, items)
            finally:
                progress.busy -= 1
            # one line per step with its wall-clock span and regions: the scale-out test reads these to see that no
            # region is ever processed by two workers at once
            regions = ",".join(sorted({key for _, key, _ in todo if key is not None}))
            log.info("step of %d %ss [%s] from %.6f to %.6f", len(todo), what, regions, started, time.time())
            for (event, key, before), outcome in zip(todo, outcomes, strict=True):
                message = event.message
                _make_current(event)
                # records first, the state after, through the same producer: the state's changelog record is
                # queued behind them. (Awaiting each delivery here stalled a worker after a rebalance under load:
                # the agent stopped consuming, so deliveries are not awaited inside the agent.)
                for out in outcome.messages:
                    await sinks[out.topic].send(key=out.key.encode(), value=out.record.to_json())
                if outcome.state is not None and key is not None and outcome.state != before:
                    table[key] = pack_state(message.partition, message.offset, outcome.state)  # only a change
                log.info("processed %s %s", what, key)
                progress.seen(message.tp, message.offset)

    for route in routes:
        table = app.Table(route.table, default=None, key_type=str, value_type=bytes, partitions=partitions)
        channel = app.topic(route.topic, key_type=bytes, value_type=bytes, partitions=partitions)
        app.agent(channel, name=f"{app.conf.id}.{route.table}")(_agent(drain, route, table))

    watched = {route.topic for route in routes}

    @app.timer(interval=STALL_CHECK_S)  # type: ignore[untyped-decorator]  # faust's timer is untyped
    async def stall_guard() -> None:
        """Re-seek a partition that has messages waiting but is not fetched (faust-streaming #629).

        After some rebalances under load a partition can stay assigned yet never reach the agent: aiokafka has
        fetched past a record faust never delivered, or never fetches the partition at all. Its pending
        acquisitions would wait until the next restart. When nothing was consumed for a whole check interval and a
        watched partition's end offset is past the next offset this worker should read (one past what it consumed
        there, or the group's committed offset for a partition it has not consumed from yet, or the earliest
        offset when the group never committed it), the partition is put back in faust's fetch set and sought
        there. A replay of a message the stored state already includes is skipped by ``drain``.
        """
        if app.rebalancing or app.in_recovery or not progress.idle(STALL_CHECK_S):
            return
        consumer: Any = app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic in watched]
        if not tps:
            return
        ends = await consumer.highwaters(*tps)
        uncommitted = [tp for tp in tps if tp not in progress.offsets and consumer._committed_offset.get(tp) is None]
        earliest = await consumer.earliest_offsets(*uncommitted) if uncommitted else {}
        for tp in tps:
            nxt = _next_offset(progress.offsets.get(tp), consumer._committed_offset.get(tp), earliest.get(tp, 0))
            if ends.get(tp, 0) > nxt:
                log.warning(
                    "partition %s stalled at offset %s (end %s): resuming it from there; %s",
                    tp,
                    nxt,
                    ends[tp],
                    _consumer_view(app, tp),
                )
                consumer.resume_partitions({tp})
                await consumer.seek(tp, nxt)
                progress.seen(tp, nxt - 1)

    return app


def _agent(drain: Callable[..., Awaitable[None]], route: Route, table: Any) -> Callable[..., Awaitable[None]]:
    """The agent function of ``route`` (a closure per route: faust names and starts each one)."""

    async def agent(stream: faust.StreamT[bytes]) -> None:
        await drain(stream, route.step, table, route.what, route.batching)

    return agent


def _next_offset(consumed: int | None, committed: int | None, earliest: int) -> int:
    """The offset a partition should be read from next: past what this worker consumed and what the group committed.

    ``committed`` is Kafka's committed position (the next offset to read), ``consumed`` the last offset this worker
    took from the partition; ``earliest`` is used when neither is known (the group never read the partition).
    """
    known = [x for x in (None if consumed is None else consumed + 1, committed) if x is not None]
    return max(known) if known else earliest


def _consumer_view(app: faust.App, tp: Any) -> dict[str, Any]:
    """What faust and aiokafka hold about ``tp`` (for the stall log)."""
    consumer: Any = app.consumer
    view: dict[str, Any] = {
        "flow_active": consumer.flow_active,
        "active": tp in (consumer._active_partitions or set()),
        "paused": tp in consumer._paused_partitions,
        "read_offset": consumer._read_offset.get(tp),
        "committed": consumer._committed_offset.get(tp),
        "flow_control": app.flow_control.is_active(),
    }
    try:
        inner = consumer._thread._ensure_consumer()
        state = inner._subscription.subscription.assignment.state_value(tp)
        view.update(
            a_paused=state.paused,
            a_valid=state.has_valid_position,
            a_position=state.position if state.has_valid_position else None,
            a_records=tp in inner._fetcher._records,
            a_in_flight=sorted(inner._fetcher._in_flight),
        )
    except Exception as exc:  # diagnostics only: never fail the guard
        view["aiokafka"] = repr(exc)
    return view


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
