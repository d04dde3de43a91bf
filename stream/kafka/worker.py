"""``terradapt worker``: the faust stream worker. Its agents move messages and store state; the pipeline does the rest.

Two agents, one loop: acquisitions go to ``Pipeline.process``, delayed labels to ``Pipeline.process_label``; each
call runs in a worker thread (``run_in_executor``: a blocked event loop stops offset commits and triggers
rebalances) with the region's stored state, and the agent stores the state the call returns and publishes its
records. Messages are keyed by region, so a region's state lives in the table partition its messages arrive on,
survives restarts and moves with the partition on a rebalance (changelog-backed tables).

Delivery is at-least-once; outputs are idempotent (the prediction object key is the acquisition id, the job id is
derived from the acquisition id, a replayed acquisition is not counted twice by the monitor).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from stream.kafka.services import Services
from stream.outcome import Outcome

log = logging.getLogger("terradapt.worker")

#: (payload, key, stored state) -> outcome: ``Pipeline.process`` or ``Pipeline.process_label``.
Step = Callable[[bytes, str | None, bytes | None], Outcome]


def create_app(services: Services) -> faust.App:
    """The faust app of the stream worker (no module-level app: each call builds a fresh one)."""
    settings = services.settings
    pipeline = services.pipeline
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
    partitions = settings.kafka.partitions
    sinks = {
        name: app.topic(topics.name(name), key_type=bytes, value_type=bytes)
        for name in ("predictions", "features", "drift_events", "adaptation_jobs", "deadletter")
    }
    # "monitors" holds RegionState bytes, "accuracy" the delayed-label tracker of each region
    states = app.Table("monitors", default=None, key_type=str, value_type=bytes, partitions=partitions)
    accuracy = app.Table("accuracy", default=None, key_type=str, value_type=bytes, partitions=partitions)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="terradapt-compute")

    async def drain(stream: faust.StreamT[bytes], step: Step, table: Any, what: str) -> None:
        loop = asyncio.get_running_loop()
        async for event in stream.events():
            raw_key, value = event.message.key, event.message.value
            key = raw_key.decode("utf-8", errors="replace") if raw_key else None
            stored = table[key] if key is not None and key in table else None
            outcome = await loop.run_in_executor(executor, step, value, key, stored)
            if outcome.state is not None and key is not None:
                table[key] = outcome.state
            for out in outcome.messages:
                await sinks[out.topic].send(key=out.key.encode(), value=out.record.to_json())
            log.info("processed %s %s", what, key)

    @app.agent(app.topic(topics.acquisitions, key_type=bytes, value_type=bytes, partitions=partitions))
    async def acquisitions(stream: faust.StreamT[bytes]) -> None:
        await drain(stream, pipeline.process, states, "acquisition")

    @app.agent(app.topic(topics.labels, key_type=bytes, value_type=bytes, partitions=partitions))
    async def labels(stream: faust.StreamT[bytes]) -> None:
        await drain(stream, pipeline.process_label, accuracy, "label")

    return app
