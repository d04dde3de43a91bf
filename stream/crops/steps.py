"""The crop loop's message calls for the Kafka workers: raw payload (+ stored region state) in, ``Outcome`` out.

The same contract as the segmentation ``stream.pipeline.Pipeline``, so the same faust agents and adaptation worker
carry both tasks::

    process_many(series items)  parse STAC item -> key = region -> read + validate the .npz -> predict a region's
                                parcels together (its current version) -> prediction object -> monitor -> trigger
                                                               => crop-predictions, drift-events, crop-jobs
    run_job(job)                parse -> idempotency / staleness -> read the job's series back -> adapt -> gate
                                -> publish + alias                                     => model-versions, rollouts
    process_label(label)        parse -> read the parcel's prediction object -> accuracy window
                                                               => (metrics)

Every error becomes a dead letter with the original payload and the reason (the worker keeps running); the stages
themselves are ``stream.crops.pipeline.CropPipeline``'s, shared with the in-process runner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from adapters.trigger import Trigger
from monitoring.metrics import AdaptationOutcome, ServiceMetrics
from monitoring.series_monitor import SeriesMonitor
from serving.crop_registry import CropRegistry
from serving.store import BlobStore, TileReader
from stream.config import Settings
from stream.crops.pipeline import CropPipeline, CropPrediction, as_mapping, calibrated_monitor, observe_parcel
from stream.crops.state import CropState, restore_crop_state
from stream.observer import MetricsObserver
from stream.outcome import KeyMismatchError, Outcome, Outgoing, compact_json, dead_letter
from stream.state import restore_tracker
from stream.topics import TopicName, Topics
from terradapt.crops.records import SeriesAcquisition
from terradapt.crops.series import ParcelSeries
from terradapt.crops.stream_records import CropAdaptationJob, ParcelLabel, ParcelPrediction
from terradapt.errors import InvalidPayloadError, TerradaptError, UnknownRegionError
from terradapt.records import DeadLetter, RolloutEvent, RolloutStep, Stage, parse_record

__all__ = ["CropSteps", "prediction_key"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
Item = tuple[bytes, str | None, bytes | None]


def prediction_key(region: str, acquisition_id: str) -> str:
    """Where a parcel's ``ParcelPrediction`` is stored in the predictions bucket."""
    return f"crops/{region}/{acquisition_id}.json"


@dataclass
class CropSteps:
    """The crop loop's calls over injected stages, stores and metrics (built by ``stream.kafka.services``).

    Args:
        pipeline: The crop stages (registry, reader, gate, settings).
        calibration: The registry's calibration vectors (``CropRegistry.calibration``).
        predictions: Where each parcel's prediction is stored (None: not stored; labels cannot be joined then).
        metrics: Prometheus metrics (None: none).
        topics: Topic names (dead letters name the full topic).
        regions: The regions served (``stream.regions``; None: any valid region code); others are dead letters.

    """

    pipeline: CropPipeline
    calibration: Mapping[str, Array]
    predictions: BlobStore | None = None
    metrics: ServiceMetrics | None = None
    topics: Topics = field(default_factory=lambda: Topics.with_prefix("terradapt."))
    regions: frozenset[str] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        registry: CropRegistry,
        reader: TileReader,
        predictions: BlobStore | None,
        metrics: ServiceMetrics | None = None,
    ) -> CropSteps:
        """The calls a crop worker runs: ``[crops]`` settings, the registry's calibration, ``stream.regions``."""
        return cls(
            CropPipeline(settings.crops, registry, reader),
            registry.calibration(),
            predictions=predictions,
            metrics=metrics,
            topics=Topics.with_prefix(settings.kafka.topic_prefix),
            regions=frozenset(settings.stream.regions) or None,
        )

    def __post_init__(self) -> None:
        cfg = self.pipeline.config
        self.config = cfg
        self.trigger = Trigger(cfg.trigger)
        self._template = calibrated_monitor(cfg.monitor, self.calibration, seed=cfg.seed)
        self.classes = self.pipeline.source_manifest.classes  # read once, with the source model
        self._observer = None if self.metrics is None else MetricsObserver(self.metrics)

    def new_monitor(self) -> SeriesMonitor:
        """A calibrated series monitor with an empty stream (a region seen for the first time)."""
        return self._template.fresh()

    def load_state(self, data: bytes | None) -> CropState:
        """A region's state from its stored bytes (fresh for a new region, or when unreadable)."""
        return restore_crop_state(data, self.new_monitor, self.config.buffer_parcels)

    # == series ====================================================================================================
    def process(self, payload: bytes, key: str | None, state: bytes | None) -> Outcome:
        """One series item through every stage; ``state`` is the stored state of the region ``key`` names."""
        return self.process_many([(payload, key, state)])[0]

    def process_many(self, items: Sequence[Item]) -> list[Outcome]:
        """``process`` over several series items in arrival order; a region's parcels are predicted together.

        A region's later items see the state its earlier items leave (monitor, trigger, buffer), as one by one.
        """
        started = time.perf_counter()
        done: dict[int, Outcome] = {}
        ready: dict[int, tuple[SeriesAcquisition, ParcelSeries]] = {}
        for i, (payload, key, _) in enumerate(items):
            try:
                item = SeriesAcquisition.from_stac(payload)
                self._check_region(item.region, key)
                ready[i] = (item, self.pipeline.load(item))
            except Exception as exc:  # every error becomes a dead letter
                done[i] = self._dead("crop_series", "ingest", exc, payload, key, started)
        by_region: dict[str, list[int]] = {}
        for i, (item, _) in ready.items():
            by_region.setdefault(item.region, []).append(i)
        for region, idx in by_region.items():
            key = items[idx[0]][1]
            state = self.load_state(items[idx[0]][2])  # the region's stored state from before the batch
            try:
                prediction = self.pipeline.predict(region, [ready[i][1] for i in idx], seed=self._seed(state))
            except Exception as exc:
                for i in idx:
                    done[i] = self._dead("crop_series", "predict", exc, items[i][0], key, started)
                continue
            for n, i in enumerate(idx):
                try:
                    out = self._observe(ready[i][0], prediction, n, state)
                except Exception as exc:
                    done[i] = self._dead("crop_series", "predict", exc, items[i][0], key, started)
                    continue
                if self.metrics is not None:
                    self.metrics.observe_tile(region, time.perf_counter() - started)
                done[i] = Outcome(tuple(out), state.to_bytes())
        return [done[i] for i in range(len(items))]

    def _seed(self, state: CropState) -> int:
        return self.config.seed + state.parcels

    def _observe(self, item: SeriesAcquisition, prediction: CropPrediction, n: int, state: CropState) -> list[Outgoing]:
        region = item.region
        record = ParcelPrediction(
            acquisition_id=item.id,
            region=region,
            parcel_id=item.parcel_id,
            model_version=prediction.version,
            predicted=int(prediction.predicted[n]),
            crop=self.classes[int(prediction.predicted[n])],
            confidence=float(prediction.confidence[n]),
        )
        if self.predictions is not None:
            href = self.predictions.put(prediction_key(region, item.id), record.to_json(), "application/json")
            record = record.model_copy(update={"href": href})
        out = [Outgoing("crop_predictions", region, record)]
        if self.metrics is not None:
            self.metrics.observe_prediction(region, prediction.version, record.confidence)
        if state.seen(item.id):  # a replay (at-least-once): predicted again, never counted twice
            log.info("series %s of %s already counted: not monitored again", item.id, region)
            return out
        state.parcels += 1
        state.add_recent(item, self.config.buffer_parcels)
        seen = observe_parcel(
            state.monitor,
            self.trigger,
            state.trigger,
            as_mapping(prediction.vectors, n),
            version=prediction.version,
            region=region,
            acquisition_id=item.id,
            parcels=state.parcels,
            buffered=len(state.recent),
        )
        update, drift = seen.update, seen.drift
        if self.metrics is not None:
            self.metrics.observe_drift(
                region, update.scores, update.thresholds, update.fired, newly_detected=update.newly_detected
            )
        if drift is not None and update.newly_detected:
            out.append(Outgoing("drift_events", region, drift))
        if seen.adapt and drift is not None:
            state.jobs += 1
            job = CropAdaptationJob(
                job_id=f"crops-{item.id}",  # derived from the series id: a replay makes the same job
                region=region,
                base_version=prediction.version,
                method=self.config.method,
                series=tuple(state.recent),
                trigger=drift,
            )
            out.append(Outgoing("crop_jobs", region, job))
            log.info("crop adaptation job %s for %s (%s)", job.job_id, region, seen.reason)
        return out

    # == adaptation jobs ===========================================================================================
    def run_job(self, payload: bytes, key: str | None) -> Outcome:
        """One crop adaptation job: read its series back, adapt, gate, publish and point the alias when accepted.

        Idempotent: a job that already published (a redelivery) republishes that version; a job whose base version
        is no longer the region's current one is stale (the region changed since) and does nothing.
        """
        started = time.perf_counter()
        region: str | None = None
        try:
            job = parse_record(CropAdaptationJob, payload)
            region = job.region
            self._check_region(job.region, key)
            return self._run_job(job, payload, started)
        except TerradaptError as exc:
            return self._dead("crop_jobs", "adapt", exc, payload, key, started)
        except Exception as exc:  # a failing job must not crash-loop the worker
            log.exception("crop adaptation job failed")
            if region is not None and self.metrics is not None:
                self.metrics.observe_adaptation(region, self.config.method, "failed", 0.0)
            return self._dead("crop_jobs", "adapt", exc, payload, key, started, "adaptation_failed")

    def _run_job(self, job: CropAdaptationJob, payload: bytes, started: float) -> Outcome:
        registry = self.pipeline.registry
        current = registry.current(job.region)
        done = registry.find_job(job.region, job.job_id)
        if done is not None:
            log.info("crop job %s already published v%s", job.job_id, done.version)
            out = [Outgoing("model_versions", job.region, done)]
            if current == job.base_version and done.version != current:
                registry.set_current(job.region, done.version)  # the crash came between publish and alias
                out.append(self._promoted(job.region, done.version, current, "alias moved on redelivery"))
            return Outcome(tuple(out))
        if job.base_version != current:
            log.info("crop job %s is stale: base v%s, region serves v%s", job.job_id, job.base_version, current)
            return Outcome()
        parcels: list[ParcelSeries] = []
        for item in job.series:
            try:
                parcels.append(self.pipeline.load(item))
            except TerradaptError as exc:
                log.warning("crop job %s: series %s unreadable (%s): left out", job.job_id, item.id, exc.reason)
        if len(parcels) <= self.config.gate_parcels:
            return self._dead(
                "crop_jobs",
                "adapt",
                f"{len(parcels)} readable series: the gate alone keeps {self.config.gate_parcels}",
                payload,
                job.region,
                started,
                "insufficient_parcels",
            )
        log.info("adapting crops of %s on %d parcels (%s)", job.region, len(parcels), job.method)
        result = self.pipeline.adapt(job.region, parcels, job.job_id)
        verdict: AdaptationOutcome = "accepted" if result.accepted else "rejected"
        log.info("crop job %s %s (%s)", job.job_id, verdict, ", ".join(result.reasons) or "gate passed")
        if self.metrics is not None:
            self.metrics.observe_adaptation(job.region, result.method, verdict, time.perf_counter() - started)
        if result.version is None:
            return Outcome()
        promoted = self._promoted(job.region, result.version.version, current, "registry alias (in-process serving)")
        return Outcome((Outgoing("model_versions", job.region, result.version), promoted))

    def _promoted(self, region: str, version: int, previous: int, detail: str) -> Outgoing:
        """The rollout event of a version the region now serves (the crop worker reads the alias at its next batch)."""
        step = RolloutStep.PROMOTED
        event = RolloutEvent(region=region, version=version, step=step, previous=previous, detail=detail)
        if self.metrics is not None:
            self.metrics.observe_rollout(event)
        return Outgoing("rollouts", region, event)

    # == delayed labels ============================================================================================
    def process_label(self, payload: bytes, key: str | None, state: bytes | None) -> Outcome:
        """Join a parcel's delayed label with its stored prediction; ``state`` is the region's accuracy tracker.

        The stored prediction names the model version that made it, so the join needs no memory of the stream.
        """
        started = time.perf_counter()
        try:
            label = parse_record(ParcelLabel, payload)
            self._check_region(label.region, key)
            if label.label >= len(self.classes):
                raise InvalidPayloadError(f"label {label.label}: the model has {len(self.classes)} crop classes")
            if self.predictions is None:
                raise InvalidPayloadError("this worker stores no predictions: delayed labels cannot be joined")
            stored = self.predictions.get(prediction_key(label.region, label.acquisition_id))
            prediction = parse_record(ParcelPrediction, stored)
        except Exception as exc:
            return self._dead("crop_labels", "labels", exc, payload, key, started)
        tracker = restore_tracker(state, max(len(self.classes), 2), self.config.label_window)
        cell = np.array([[prediction.predicted]], dtype=np.int64)
        tracker.record_prediction(label.acquisition_id, label.region, prediction.model_version, class_map=cell)
        join = tracker.add_label(label.acquisition_id, np.array([[label.label]], dtype=np.int64))
        if self._observer is not None:
            self._observer.labelled(label.region, join)
        return Outcome((), compact_json(tracker.state_dict()))

    def _check_region(self, region: str, key: str | None) -> None:
        if self.regions is not None and region not in self.regions:
            raise UnknownRegionError(region, sorted(self.regions))
        if key != region:
            raise KeyMismatchError(key, region)

    # == dead letters ==============================================================================================
    def _dead(
        self,
        topic: TopicName,
        stage: Stage,
        error: Exception | str,
        payload: bytes,
        key: str | None,
        started: float,
        reason: str | None = None,
    ) -> Outcome:
        """A dead letter with the original payload and the reason (a typed error's own; else ``internal_error``)."""
        if isinstance(error, Exception) and not isinstance(error, TerradaptError):
            log.error("unexpected error on %s message %s", topic, key, exc_info=error)
        letter: DeadLetter = dead_letter(self.topics.name(topic), stage, error, payload, key, reason)
        if self.metrics is not None:
            self.metrics.observe_dead_letter(letter.reason)
            self.metrics.observe_tile(key or "other", time.perf_counter() - started, "dead_letter")
        return Outcome((Outgoing("deadletter", key or "unknown", letter),))
