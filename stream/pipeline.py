"""The flow of every message through every stage, written once for every runner.

Three message kinds, three calls; each takes the raw payload (and, where the message kind has one, the region's
stored state) and returns what to publish (and the region's new state). Nothing else orders stages::

    process(acquisition)   parse -> region -> read object -> validate raster -> predict (+ features, same pass)
                           -> prediction COG -> monitor -> trigger                 => predictions, features,
                                                                                      drift-events, adaptation-jobs
    run_job(job)           parse -> idempotency / staleness -> read tiles (+ labelled tiles of a few-shot job)
                           -> adapt or reset (adapters.policy) | few-shot (adapters.fewshot)
                           -> gate -> publish -> rollout (same gate context)       => model-versions, rollouts
    process_label(label)   parse -> read mask -> read prediction COG -> join -> accuracy window
                           -> label store -> few-shot job when the region's label count is due
                                                                                   => (metrics), adaptation-jobs

Any typed error becomes a dead letter with the original payload and the reason; an unexpected error too
(``internal_error`` / ``adaptation_failed``), so no runner has a try/except of its own. The embedded runner calls
these in a loop over in-memory queues; the faust agents call ``process_many`` (the acquisitions waiting, predicted
together) and ``process_label`` and store the returned state in their tables; the adaptation worker calls
``run_job``. No stage knows which runner carries it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from adapters.buffer import BufferedTile
from adapters.config import AdaptationConfig
from adapters.fewshot import few_shot_context, rollout_tiles, run_few_shot
from adapters.gate import GateContext
from adapters.policy import AdaptationOutcome, adapt_or_reset, gate_context
from adapters.selection import Selector
from adapters.tile_quality import informative_tiles
from adapters.trigger import Trigger, TriggerConfig
from monitoring.calibration import CalibrationData, CalibrationError
from monitoring.monitor import MonitorConfig, MonitorUpdate, RegionMonitor
from serving.label_store import LabelStore
from serving.predictor import Predictor, TileOutput
from serving.registry import SOURCE, ModelRegistry
from serving.rollout import Deployer, RolloutContext
from serving.store import BlobStore, TileReader
from stream.job_tiles import job_tiles, labelled_tiles
from stream.labels import keep_label
from stream.observer import NullObserver, PipelineObserver, timed
from stream.outcome import (
    KeyMismatchError,
    Outcome,
    Outgoing,
    compact_json,
    dead_letter,
)
from stream.predicting import predict_with_retries, store_prediction
from stream.state import RecentTile, RegionState, restore_region, restore_tracker
from stream.topics import TopicName, Topics
from terradapt.checkpoint import ModelManifest
from terradapt.classes import flair_to_13
from terradapt.errors import InvalidPayloadError, TerradaptError, UnknownRegionError
from terradapt.model import SegmentationModel
from terradapt.raster import Raster, RasterSpec, read_prediction, read_raster
from terradapt.records import (
    Acquisition,
    AdaptationJob,
    DriftEvent,
    LabelRecord,
    ModelVersion,
    Stage,
    TilePrediction,
    parse_record,
)

log = logging.getLogger(__name__)

#: What a label mask must be: one band, any CRS, unlabelled pixels allowed everywhere.
MASK_SPEC = RasterSpec(band_count=1, require_crs=False, max_nodata_fraction=1.0)


@dataclass(frozen=True)
class _Observed:
    update: MonitorUpdate | None
    drift: DriftEvent | None
    job: AdaptationJob | None


@dataclass
class Pipeline:
    """Every stage, with every dependency injected (built from settings by ``stream.build``)."""

    registry: ModelRegistry
    predictor: Predictor
    deployer: Deployer
    reader: TileReader
    predictions: BlobStore | None = None
    labels: LabelStore | None = None
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    monitor_config: MonitorConfig = field(default_factory=MonitorConfig)
    trigger_config: TriggerConfig = field(default_factory=TriggerConfig)
    spec: RasterSpec = field(default_factory=RasterSpec.flair)
    regions: frozenset[str] | None = None
    buffer_tiles: int = 16
    predict_retries: int = 3
    label_window: int = 50
    topics: Topics = field(default_factory=lambda: Topics.with_prefix("terradapt."))
    observer: PipelineObserver = field(default_factory=NullObserver)
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self.trigger = Trigger(self.trigger_config)

    # == acquisitions =============================================================================================
    def process(self, payload: bytes, key: str | None, state: bytes | None) -> Outcome:
        """One acquisition through every stage; ``state`` is the stored state of the region ``key`` names."""
        return self.process_many([(payload, key, state)])[0]

    def process_many(self, items: Sequence[tuple[bytes, str | None, bytes | None]]) -> list[Outcome]:
        """``process`` over several acquisitions (payload, key, stored state) in arrival order, predicted together.

        Each item's state is its region's stored state from before the batch; a region's later items see the state
        its earlier items leave, so the outcomes (decisions included) are those of the items processed one by one.
        The tiles of one region go to the predictor in one call, which batches them into forward passes.
        """
        started = time.perf_counter()
        done: dict[int, Outcome] = {}
        ready: dict[int, tuple[Acquisition, Raster]] = {}
        for i, (payload, key, _) in enumerate(items):
            acq: Acquisition | None = None
            try:
                acq = self._acquisition(payload, key)
                with timed(self.observer, "read"):
                    ready[i] = (acq, read_raster(self.reader.get(acq.href), self.spec))
            except Exception as exc:  # every error becomes a dead letter (``_failed``)
                done[i] = self._failed(exc, payload, key, acq, started)
        outputs = self._predict_regions(ready, items, done, started)
        states: dict[str | None, bytes | None] = {}
        for i, (payload, key, stored) in enumerate(items):
            if i in done:
                continue
            acq, raster = ready[i]
            try:
                output, latency = outputs[i]
                prediction = store_prediction(
                    acq,
                    raster,
                    output,
                    latency,
                    self.predictions,
                    self.observer,
                    self.class_names,
                    self.registry.stac_item_uri,
                )
                region_state = self.load_state(states.get(key, stored))
                observed = self._observe(acq, prediction, output, region_state)
            except Exception as exc:
                done[i] = self._failed(exc, payload, key, acq, started)
                continue
            out = [
                Outgoing("predictions", acq.region, prediction),
                Outgoing("features", acq.region, output.features.to_record(acq.id, acq.region, output.version)),
            ]
            if observed.drift is not None and observed.update is not None and observed.update.newly_detected:
                out.append(Outgoing("drift_events", acq.region, observed.drift))
            if observed.job is not None:
                out.append(Outgoing("adaptation_jobs", acq.region, observed.job))
            self.observer.tile_done(acq.region, time.perf_counter() - started)
            states[key] = region_state.to_bytes()
            done[i] = Outcome(tuple(out), states[key])
        return [done[i] for i in range(len(items))]

    def _failed(
        self, exc: Exception, payload: bytes, key: str | None, acq: Acquisition | None, started: float
    ) -> Outcome:
        """An acquisition's dead letter: a typed error keeps its reason, anything else is an ``internal_error``."""
        if isinstance(exc, TerradaptError):
            return self._dead("acquisitions", "predict", exc, payload, key, acq.region if acq else None, started)
        log.error("unexpected error on acquisition %s", key, exc_info=exc)  # never lose a message to a bug
        return self._dead("acquisitions", "predict", exc, payload, key, None, started)

    def _predict_regions(
        self,
        ready: dict[int, tuple[Acquisition, Raster]],
        items: Sequence[tuple[bytes, str | None, bytes | None]],
        done: dict[int, Outcome],
        started: float,
    ) -> dict[int, tuple[TileOutput, float]]:
        """Each region's tiles predicted in one predictor call (its current model); a failed call dead-letters them.

        Returns each predicted item's output and the latency of the call that made it.
        """
        by_region: dict[str, list[int]] = {}
        for i, (acq, _) in ready.items():
            by_region.setdefault(acq.region, []).append(i)
        outputs: dict[int, tuple[TileOutput, float]] = {}
        for region, idx in by_region.items():
            t0 = time.perf_counter()
            try:
                with timed(self.observer, "predict"):
                    rasters = [ready[i][1] for i in idx]
                    outs = predict_with_retries(self.predictor, region, rasters, self.predict_retries, self.sleep)
            except Exception as exc:
                for i in idx:
                    done[i] = self._failed(exc, items[i][0], items[i][1], ready[i][0], started)
                continue
            latency = time.perf_counter() - t0
            outputs.update({i: (out, latency) for i, out in zip(idx, outs, strict=True)})
        return outputs

    def _acquisition(self, payload: bytes, key: str | None) -> Acquisition:
        acq = Acquisition.from_stac(payload)
        self._check_region(acq.region, key)
        return acq

    def _check_region(self, region: str, key: str | None) -> None:
        if self.regions is not None and region not in self.regions:
            raise UnknownRegionError(region, sorted(self.regions))
        if key != region:
            raise KeyMismatchError(key, region)

    def _observe(
        self, acq: Acquisition, prediction: TilePrediction, output: TileOutput, state: RegionState
    ) -> _Observed:
        """Update the region's monitor; turn a covariate-drift alarm into an adaptation job when due.

        A replayed acquisition (already among the region's recent tiles: at-least-once delivery after a crash)
        is predicted again but not counted twice, so the decisions stay those of an uninterrupted stream. The job
        carries the tiles that arrived since the drift was detected (tiles from before the change would adapt the
        model to the old distribution), and the trigger waits until there are enough of them.
        """
        with timed(self.observer, "observe"):
            if state.seen(acq.id):
                return _Observed(None, None, None)
            update = state.monitor.update(output.features, output.version)
            state.add_recent(RecentTile(acq.id, acq.href), self.buffer_tiles)
            since = state.monitor.tiles_since_detection
            tiles = list(state.recent)[-since:] if since else list(state.recent)
            self.trigger.observe(state.trigger)
            drift = None
            if update.fired:
                signal = max(update.fired, key=lambda s: update.scores[s] / max(update.thresholds[s], 1e-12))
                drift = DriftEvent(
                    region=acq.region,
                    acquisition_id=acq.id,
                    tiles_seen=state.monitor.tiles_seen,
                    signal=signal,
                    score=update.scores[signal],
                    threshold=update.thresholds[signal],
                    fired=update.fired,
                    covariate=update.covariate_shift,
                    scores=dict(update.scores),
                )
            decision = self.trigger.decide(
                state.trigger,
                drifted=update.newly_detected or bool(update.fired),
                covariate=update.covariate_shift,
                buffered=len(tiles),
                adapted=output.version > 0,
            )
            job = None
            if decision.adapt and drift is not None:
                job = AdaptationJob(
                    job_id=f"adapt-{acq.id}",
                    region=acq.region,
                    base_version=output.version,
                    method=self.adaptation.method_for(acq.region).method,
                    tile_ids=tuple(t.acquisition_id for t in tiles),
                    tile_hrefs=tuple(t.href for t in tiles),
                    trigger=drift,
                )
        self.observer.monitored(prediction, update)
        return _Observed(update, drift, job)

    # == region state ==============================================================================================
    @functools.cached_property
    def calibration(self) -> CalibrationData:
        """The source model's calibration data (read once from the registry).

        Raises:
            CalibrationError: It was computed with other weights than the registry's source model.

        """
        data = self.registry.calibration()
        sha = self.registry.manifest(SOURCE, 0).sha256
        if data.model_sha256 and data.model_sha256 != sha:
            raise CalibrationError(
                f"calibration was computed with source weights {data.model_sha256[:12]}..., the registry's source "
                f"model is {sha[:12]}...: run `terradapt registry-init` again"
            )
        return data

    @functools.cached_property
    def selector(self) -> Selector | None:
        """The label-free selection estimator, fitted with this pipeline's settings on the calibration's domains.

        None when the calibration holds no selection domains (calibrated without labels) or selection is off:
        the gate's class-mix heuristics decide then.
        """
        return Selector.from_rows(self.calibration.selection, self.adaptation.gate.selection)

    @functools.cached_property
    def _monitor_template(self) -> RegionMonitor:
        return RegionMonitor.from_calibration(self.monitor_config, self.calibration)

    def new_monitor(self) -> RegionMonitor:
        """A monitor of this pipeline's settings, calibrated on the stored calibration data, with an empty stream."""
        return self._monitor_template.fresh()

    def load_state(self, data: bytes | None) -> RegionState:
        """A region's state from its stored bytes (fresh for a new region, or when unreadable)."""
        return restore_region(data, self.new_monitor, self.buffer_tiles)

    # == adaptation jobs ===========================================================================================
    def run_job(self, payload: bytes, key: str | None) -> Outcome:
        """One adaptation job: adapt (or go back to source), gate, publish, roll out with the same gate inputs.

        Idempotent: a job that already published its version (a redelivery after a crash) republishes that
        version and, when the crash came before the rollout, rolls it out now. A job whose base version is no
        longer the region's current one is stale (another job adapted the region since) and does nothing.
        """
        started = time.perf_counter()
        region: str | None = None
        try:
            job = parse_record(AdaptationJob, payload)
            region = job.region
            self._check_region(job.region, key)
            return self._run_job(job, payload, started)
        except TerradaptError as exc:
            return self._dead("adaptation_jobs", "adapt", exc, payload, key, region, started)
        except Exception as exc:  # a failing job must not crash-loop the worker
            log.exception("adaptation job failed")
            if region is not None:
                self.observer.adapted(region, self.adaptation.method_for(region).method, "failed", 0.0)
            return self._dead("adaptation_jobs", "adapt", exc, payload, key, region, started, "adaptation_failed")

    def _run_job(self, job: AdaptationJob, payload: bytes, started: float) -> Outcome:
        current = self.registry.current(job.region)
        done = self.registry.find_job(job.region, job.job_id)
        if done is None and job.base_version != current:
            log.info("job %s is stale: base v%s, region now serves v%s", job.job_id, job.base_version, current)
            return Outcome()
        tiles = informative_tiles(job_tiles(job, self.reader, self.spec), self.adaptation.gate.tile_quality)
        labelled = labelled_tiles(job, self.labels, self.spec)
        if not tiles and not labelled:
            return self._dead(
                "adaptation_jobs",
                "adapt",
                "no readable tile for the job",
                payload,
                job.region,
                job.region,
                started,
                "no_tiles",
            )
        source, manifest = self.registry.load(job.region, 0)
        confusion = self.calibration.confusion_matrix()
        # a few-shot version's deployer sees every image but no mask: labels never evaluate what they trained
        checked = rollout_tiles(tiles, labelled)
        if done is not None:
            log.info("job %s already published v%s", job.job_id, done.version)
            out: list[Outgoing] = [Outgoing("model_versions", job.region, done)]
            if done.accepted and current == job.base_version and done.version != current:
                context = self._gate_context(job, tiles, labelled, source, manifest, confusion)
                out += self._deploy(done, RolloutContext(checked, context))
            return Outcome(tuple(out))
        log.info("adapting %s on %d tiles (%d labelled)", job.region, len(tiles), len(labelled))
        outcome = self._adapt(job, tiles, labelled, source, manifest, confusion)
        version = self.registry.publish(outcome.weights, outcome.manifest)
        elapsed = time.perf_counter() - started
        self.observer.adapted(job.region, version.method, "accepted" if version.accepted else "rejected", elapsed)
        out = [Outgoing("model_versions", job.region, version)]
        if version.accepted:
            out += self._deploy(version, RolloutContext(checked, outcome.context))
        return Outcome(tuple(out))

    def _adapt(
        self,
        job: AdaptationJob,
        tiles: list[BufferedTile],
        labelled: list[BufferedTile],
        source: SegmentationModel,
        manifest: ModelManifest,
        confusion: np.ndarray | None,
    ) -> AdaptationOutcome:
        """The candidate of a job: few-shot when it names labelled tiles, else adapt-or-reset (label-free)."""
        current: SegmentationModel | None = None
        current_labels: tuple[str, ...] = ()
        if job.base_version != 0:
            current, current_manifest = self.registry.load(job.region, job.base_version)
            current_labels = current_manifest.labels_used
        if job.labels:
            return run_few_shot(
                job,
                source,
                manifest,
                labelled,
                tiles,
                self.adaptation.few_shot,
                current=current,
                current_labels=current_labels,
                device=self.adaptation.device,
            )
        return adapt_or_reset(
            job,
            tiles,
            source,
            manifest,
            self.adaptation,
            new_monitor=self.new_monitor,
            confusion=confusion,
            current=current,
            selector=self.selector,
        )

    def _gate_context(
        self,
        job: AdaptationJob,
        tiles: list[BufferedTile],
        labelled: list[BufferedTile],
        source: SegmentationModel,
        manifest: ModelManifest,
        confusion: np.ndarray | None,
    ) -> GateContext:
        """The context a redelivered job's version is rolled out with: the one its candidate was judged with."""
        if job.labels:
            return few_shot_context(job, labelled, manifest)
        method = self.adaptation.method_for(job.region).method
        return gate_context(
            job, tiles, source, manifest, confusion, self.adaptation.device, selector=self.selector, method=method
        )

    def _deploy(self, version: ModelVersion, context: RolloutContext) -> list[Outgoing]:
        event = self.deployer.rollout(version.region, version.version, context)
        self.observer.rolled_out(event)
        return [Outgoing("rollouts", version.region, event)]

    # == delayed labels ============================================================================================
    @functools.cached_property
    def class_names(self) -> tuple[str, ...]:
        """Classes of the source model (every version has the same): the legend of every prediction COG."""
        return self.registry.manifest(SOURCE, 0).classes

    @property
    def num_classes(self) -> int:
        """How many classes the models predict."""
        return len(self.class_names)

    def process_label(self, payload: bytes, key: str | None, state: bytes | None) -> Outcome:
        """Join one delayed label with the stored prediction of its acquisition; ``state`` is the region's tracker.

        The prediction COG carries the model version that made it (its tags), so the join needs no memory of the
        prediction: a label may arrive after restarts and rollouts. A joined label is also kept in the label store
        (few-shot adaptation), and when the region's label count is due the outcome carries a few-shot job.
        """
        started = time.perf_counter()
        try:
            label = parse_record(LabelRecord, payload)
            self._check_region(label.region, key)
            if self.predictions is None:
                raise InvalidPayloadError("this pipeline stores no predictions: delayed labels cannot be joined")
            mask = read_raster(self.reader.get(label.href), MASK_SPEC).data[0].astype(np.uint8)
            if label.encoding == "flair19":
                mask = flair_to_13(mask)
            class_map, tags = read_prediction(self.predictions.get(f"{label.region}/{label.acquisition_id}.tif"))
            tracker = restore_tracker(state, self.num_classes, self.label_window)
            version = int(tags.get("model_version", "-1"))
            tracker.record_prediction(label.acquisition_id, label.region, version, class_map=class_map)
            join = tracker.add_label(label.acquisition_id, mask)
        except TerradaptError as exc:
            return self._dead("labels", "labels", exc, payload, key, None, started)
        except Exception as exc:
            log.exception("unexpected error on label %s", key)
            return self._dead("labels", "labels", exc, payload, key, None, started)
        self.observer.labelled(label.region, join)
        new_state = compact_json(tracker.state_dict())
        if join.outcome == "invalid":
            letter = dead_letter(self.topics.name("labels"), "labels", join.detail, payload, key, "invalid_tile")
            self.observer.dead_letter(letter, None, time.perf_counter() - started)
            return Outcome((Outgoing("deadletter", key or "unknown", letter),), new_state)
        job = keep_label(self.labels, self.registry, self.adaptation.few_shot, label, mask, tags, join)
        return Outcome(() if job is None else (Outgoing("adaptation_jobs", label.region, job),), new_state)

    # == dead letters ==============================================================================================
    def _dead(
        self,
        topic: TopicName,
        stage: Stage,
        error: Exception | str,
        payload: bytes,
        key: str | None,
        region: str | None,
        started: float,
        reason: str | None = None,
    ) -> Outcome:
        """The one way a dead letter is made: original payload, reason, error text; counted by the observer."""
        letter = dead_letter(self.topics.name(topic), stage, error, payload, key, reason)
        valid_region = region if region is not None and (self.regions is None or region in self.regions) else None
        self.observer.dead_letter(letter, valid_region, time.perf_counter() - started)
        return Outcome((Outgoing("deadletter", key or "unknown", letter),))
