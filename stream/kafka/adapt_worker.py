"""``terradapt adapt-worker``: adaptation jobs, in their own process, off the stream worker's event loop.

A plain kafka-python consumer in its own consumer group. For each job: fetch the region's recent tiles from
object storage, adapt (cuda when available), gate, publish the version to the registry, roll it out (accepted
versions only), publish model-versions and rollouts, and only then commit the offset (at-least-once).

A job delivered twice registers one version: ``ModelRegistry.publish`` returns the version already made for a
job id. A job whose base version is no longer the region's current one is stale (another job already
adapted the region) and is skipped, so a burst of alarms cannot stack versions.
"""

from __future__ import annotations

import logging
import signal
import threading

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from adapters.buffer import BufferedTile
from stream.kafka.ingest import make_producer
from stream.kafka.services import Services
from terradapt.errors import TerradaptError
from terradapt.records import AdaptationJob, DeadLetter, ModelVersion, Record, RolloutEvent, parse_record

log = logging.getLogger("terradapt.adapt_worker")


class AdaptWorker:
    """Consume adaptation jobs until stopped."""

    def __init__(
        self,
        services: Services,
        consumer: KafkaConsumer | None = None,
        producer: KafkaProducer | None = None,
    ) -> None:
        self.s = services
        kafka = services.settings.kafka
        self.consumer = consumer or KafkaConsumer(
            services.topics.adaptation_jobs,
            bootstrap_servers=kafka.bootstrap,
            group_id=f"{services.settings.stream.app_id}-adapt",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=1,
            max_poll_interval_ms=30 * 60 * 1000,
            session_timeout_ms=int(kafka.session_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, kafka.session_timeout_s / 3) * 1000),
            client_id="terradapt-adapt-worker",
        )
        self.producer = producer or make_producer(kafka.bootstrap)
        self.stopping = threading.Event()

    def _send(self, topic: str, key: str, record: Record) -> None:
        self.producer.send(getattr(self.s.topics, topic), key=key.encode(), value=record.to_json()).get(timeout=30)

    def handle(self, key: bytes | None, value: bytes) -> list[tuple[str, Record]]:
        """Process one job message; return the (topic, record) pairs published."""
        try:
            job = parse_record(AdaptationJob, value)
        except TerradaptError as exc:
            letter = DeadLetter(
                topic=self.s.topics.adaptation_jobs,
                reason=exc.reason,
                error=str(exc),
                payload=value.decode("utf-8", errors="replace"),
                key=key.decode() if key else None,
                stage="adapt",
            )
            return [("deadletter", letter)]
        registry = self.s.pipeline.registry
        done = registry.find_job(job.region, job.job_id)
        if done is not None:
            log.info("job %s already published as v%s", job.job_id, done.version)
            return [("model_versions", done)]
        current = registry.current(job.region)
        if job.base_version != current:
            log.info("job %s is stale: base v%s, region now serves v%s", job.job_id, job.base_version, current)
            return []
        tiles = []
        for tile_id, href in zip(job.tile_ids, job.tile_hrefs, strict=False):
            try:
                raster = self.s.pipeline.read_data(self.s.reader.get(href))
            except TerradaptError as exc:
                log.warning("job %s: tile %s unusable (%s)", job.job_id, tile_id, exc)
                continue
            tiles.append(BufferedTile(tile_id, raster.data.astype(np.uint8), href=href))
        if not tiles:
            letter = DeadLetter(
                topic=self.s.topics.adaptation_jobs,
                reason="no_tiles",
                error="no readable tile for the job",
                payload=value.decode(),
                key=job.region,
                stage="adapt",
            )
            return [("deadletter", letter)]
        log.info("adapting %s: %s on %d tiles", job.region, job.method, len(tiles))
        adapted = self.s.pipeline.adapt(job, tiles)
        out: list[tuple[str, Record]] = [("model_versions", adapted.version)]
        self.s.rollout_tiles[job.region] = tiles
        try:
            event = self.s.pipeline.deploy(adapted.version)
        finally:
            self.s.rollout_tiles.pop(job.region, None)
        if event is not None:
            out.append(("rollouts", event))
        return out

    def run(self, max_messages: int | None = None) -> int:
        """Poll-process-commit until stopped (or ``max_messages`` handled); return the number handled."""
        handled = 0
        while not self.stopping.is_set():
            batches = self.consumer.poll(timeout_ms=500, max_records=1)
            for records in batches.values():
                for msg in records:
                    try:
                        published = self.handle(msg.key, msg.value)
                    except Exception as exc:  # a failing job must not crash-loop the worker
                        log.exception("adaptation job failed")
                        letter = DeadLetter(
                            topic=self.s.topics.adaptation_jobs,
                            reason="adaptation_failed",
                            error=repr(exc),
                            payload=msg.value.decode("utf-8", errors="replace"),
                            stage="adapt",
                        )
                        published = [("deadletter", letter)]
                    for topic, record in published:
                        self._send(topic, _key_of(record), record)
                    self.consumer.commit()
                    handled += 1
            if max_messages is not None and handled >= max_messages:
                break
        return handled

    def close(self) -> None:
        """Leave the group and flush."""
        self.consumer.close()
        self.producer.flush()
        self.producer.close()


def _key_of(record: Record) -> str:
    if isinstance(record, (ModelVersion, RolloutEvent, AdaptationJob)):
        return record.region
    return getattr(record, "key", None) or "unknown"


def run_forever(worker: AdaptWorker) -> None:
    """Run until SIGTERM/SIGINT, then close cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    try:
        worker.run()
    finally:
        worker.close()
