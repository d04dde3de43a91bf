"""``terradapt adapt-worker``: adaptation jobs, in their own process, off the stream worker's event loop.

A plain kafka-python consumer in its own consumer group. For each job it calls ``Pipeline.run_job`` (read tiles,
adapt or reset, gate, publish, roll out: cuda when available), publishes what it returns, and only then commits
the offset (at-least-once; ``run_job`` is idempotent per job id). ``crop_adapt_worker`` is the same worker on
the crop jobs topic (``CropSteps.run_job``), in a consumer group of its own.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from stream.kafka.ingest import make_producer
from stream.kafka.security import client_options
from stream.kafka.services import CropServices, Services
from stream.outcome import Outcome

log = logging.getLogger("terradapt.adapt_worker")


class AdaptWorker:
    """Consume adaptation jobs until stopped."""

    def __init__(
        self,
        services: Services | CropServices,
        consumer: KafkaConsumer | None = None,
        producer: KafkaProducer | None = None,
        *,
        run_job: Callable[[bytes, str | None], Outcome] | None = None,
        topic: str | None = None,
        group: str = "adapt",
    ) -> None:
        self.s = services
        if run_job is None:
            if not isinstance(services, Services):
                raise TypeError("run_job is required with crop services: use crop_adapt_worker")
            run_job = services.pipeline.run_job
        self.run_job = run_job
        kafka = services.settings.kafka
        self.consumer = consumer or KafkaConsumer(
            topic or services.topics.adaptation_jobs,
            **client_options(kafka),
            group_id=f"{services.settings.stream.app_id}-{group}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=1,
            max_poll_interval_ms=30 * 60 * 1000,
            session_timeout_ms=int(kafka.session_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, kafka.session_timeout_s / 3) * 1000),
            client_id="terradapt-adapt-worker",
        )
        self.producer = producer or make_producer(kafka)
        self.stopping = threading.Event()

    def publish(self, outcome: Outcome) -> None:
        """Send every record of an outcome and wait for the broker's acknowledgement.

        While the broker is away the send is retried with backoff until it is acknowledged or the worker is
        stopped: the job's offset is committed only after its records are published, so giving up here would
        only make a restarted worker redo the job.
        """
        for out in outcome.messages:
            topic = self.s.topics.name(out.topic)
            value = out.record.to_json()
            delay = 0.5
            while True:
                try:
                    self.producer.send(topic, key=out.key.encode(), value=value).get(timeout=30)
                    break
                except KafkaError as exc:
                    if self.stopping.is_set():
                        raise
                    log.warning("broker unavailable (%s), retrying the publish in %.1f s", type(exc).__name__, delay)
                    self.stopping.wait(delay)
                    delay = min(2 * delay, 10.0)

    def run(self, max_messages: int | None = None) -> int:
        """Poll-process-publish-commit until stopped (or ``max_messages`` handled); return the number handled."""
        handled = 0
        while not self.stopping.is_set():
            batches = self.consumer.poll(timeout_ms=500, max_records=1)
            for records in batches.values():
                for msg in records:
                    key = msg.key.decode("utf-8", errors="replace") if msg.key else None
                    self.publish(self.run_job(msg.value, key))
                    self.consumer.commit()
                    log.info("handled adaptation job of %s (partition %s, offset %s)", key, msg.partition, msg.offset)
                    handled += 1
            if max_messages is not None and handled >= max_messages:
                break
        return handled

    def close(self) -> None:
        """Leave the group and flush."""
        self.consumer.close()
        self.producer.flush()
        self.producer.close()


def crop_adapt_worker(services: CropServices) -> AdaptWorker:
    """The crop loop's adaptation worker: crop jobs topic, ``CropSteps.run_job``, group ``<app_id>-crops-adapt``."""
    return AdaptWorker(services, run_job=services.steps.run_job, topic=services.topics.crop_jobs, group="crops-adapt")


def run_forever(worker: AdaptWorker) -> None:
    """Run until SIGTERM/SIGINT, then close cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    try:
        worker.run()
    finally:
        worker.close()
