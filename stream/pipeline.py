"""The flow of one acquisition through every stage, written once for every runner.

    Acquisition -> read + validate -> predict -> features -> monitor -> trigger -> AdaptationJob
    AdaptationJob -> adapt -> gate -> publish (ModelVersion) -> rollout (RolloutEvent) -> monitor re-baseline

The embedded runner calls these methods in a plain loop; the faust agents call the same methods, the adaptation
step in its own process. Per-region state (monitor, trigger, tile buffer) is passed in by the runner, which owns
where it lives (memory, or a changelog-backed faust table).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from adapters.buffer import BufferedTile
from adapters.gate import GateResult
from adapters.job import AdaptationConfig, reset_to_source, run_adaptation
from adapters.trigger import Trigger, TriggerDecision
from monitoring.features import TileFeatures
from monitoring.label_shift import BBSE
from monitoring.metrics import ServiceMetrics
from monitoring.monitor import MonitorConfig, MonitorUpdate, RegionMonitor
from serving.predictor import Predictor, TileOutput
from serving.registry import ModelRegistry
from serving.rollout import Deployer
from serving.store import BlobStore
from terradapt.classes import IGNORE_INDEX
from terradapt.errors import TerradaptError, UnknownRegionError
from terradapt.metrics import confusion_matrix
from terradapt.raster import Raster, RasterSpec, read_raster, write_cog
from terradapt.records import (
    Acquisition,
    AdaptationJob,
    DriftEvent,
    FeatureStats,
    ModelVersion,
    RolloutEvent,
    TilePrediction,
)

CALIBRATION_KEY = "models/source/0/calibration.json"


def feature_record(acq: Acquisition, f: TileFeatures, version: int) -> FeatureStats:
    """The FeatureStats record of a tile."""
    return FeatureStats(
        acquisition_id=acq.id,
        region=acq.region,
        model_version=version,
        band_mean=tuple(map(float, f.band_mean)),
        band_std=tuple(map(float, f.band_std)),
        residual_mean=tuple(map(float, f.residual_mean)),
        residual_std=tuple(map(float, f.residual_std)),
        deep_mean=tuple(map(float, f.deep)),
        bn_mean_shift=f.bn_mean_shift,
        bn_var_ratio=f.bn_var_ratio,
        class_shares=tuple(map(float, f.class_shares)),
        mean_entropy=f.mean_entropy,
        mean_confidence=f.mean_confidence,
    )


def features_from_record(r: FeatureStats) -> TileFeatures:
    """Back from the record (what the Kafka monitor consumes) to numpy features."""
    return TileFeatures(
        band_mean=np.asarray(r.band_mean),
        band_std=np.asarray(r.band_std),
        residual_mean=np.asarray(r.residual_mean),
        residual_std=np.asarray(r.residual_std),
        deep=np.asarray(r.deep_mean),
        bn_mean_shift=r.bn_mean_shift,
        bn_var_ratio=r.bn_var_ratio,
        class_shares=np.asarray(r.class_shares),
        mean_entropy=r.mean_entropy,
        mean_confidence=r.mean_confidence,
    )


@dataclass(frozen=True)
class Predicted:
    """Output of the predict stage."""

    raster: Raster
    output: TileOutput
    prediction: TilePrediction
    features: FeatureStats


@dataclass(frozen=True)
class Observed:
    """Output of the monitor + trigger stages."""

    update: MonitorUpdate
    drift: DriftEvent | None
    decision: TriggerDecision
    job: AdaptationJob | None


@dataclass(frozen=True)
class Adapted:
    """Output of the adapt + gate + publish stages."""

    version: ModelVersion
    gate: GateResult


@dataclass
class Pipeline:
    """Stage functions with every dependency injected."""

    registry: ModelRegistry
    predictor: Predictor
    deployer: Deployer
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    monitor_config: MonitorConfig = field(default_factory=MonitorConfig)
    spec: RasterSpec = field(default_factory=RasterSpec.flair)
    regions: frozenset[str] | None = None
    predictions: BlobStore | None = None
    metrics: ServiceMetrics | None = None
    _calibration: dict[str, Any] | None = None

    # -- read ------------------------------------------------------------------------------------------------
    def check_region(self, region: str) -> None:
        """Refuse regions outside the configured set (when one is configured)."""
        if self.regions is not None and region not in self.regions:
            raise UnknownRegionError(region, sorted(self.regions))

    def read(self, acq: Acquisition, data: bytes | str) -> Raster:
        """Validate region and raster (typed errors name the bad field)."""
        t0 = time.perf_counter()
        self.check_region(acq.region)
        raster = self.read_data(data)
        if self.metrics is not None:
            self.metrics.observe_stage("read", time.perf_counter() - t0)
        return raster

    def rejected(self, acq_region: str | None, error: TerradaptError | str, started: float) -> None:
        """Account for an acquisition that ends as a dead letter (metrics only; the runner publishes it)."""
        if self.metrics is None:
            return
        reason = error if isinstance(error, str) else error.reason
        self.metrics.observe_dead_letter(reason)
        if acq_region is not None:
            self.metrics.observe_tile(acq_region, time.perf_counter() - started, "dead_letter")

    def done(self, region: str, started: float) -> None:
        """Account for an acquisition that went through every stage."""
        if self.metrics is not None:
            self.metrics.observe_tile(region, time.perf_counter() - started, "ok")

    def read_data(self, data: bytes | str) -> Raster:
        """Read and validate a raster against the configured spec."""
        return read_raster(data, self.spec)

    # -- predict ---------------------------------------------------------------------------------------------
    def predict(self, acq: Acquisition, raster: Raster) -> Predicted:
        """Predict with the region's current model, store the prediction COG, build the records."""
        t0 = time.perf_counter()
        out = self.predictor.predict(acq.region, [raster.data.astype(np.uint8)])[0]
        latency = time.perf_counter() - t0
        href = None
        if self.predictions is not None:
            tags = {"acquisition_id": acq.id, "region": acq.region, "model_version": str(out.version)}
            cog = write_cog(out.class_map, raster.crs, raster.transform, tags=tags)
            href = self.predictions.put(f"{acq.region}/{acq.id}.tif", cog, "image/tiff")
        f = out.features
        prediction = TilePrediction(
            acquisition_id=acq.id,
            region=acq.region,
            model_version=out.version,
            href=href,
            class_shares=tuple(map(float, f.class_shares)),
            mean_entropy=f.mean_entropy,
            latency_s=latency,
        )
        if self.metrics is not None:
            self.metrics.observe_stage("predict", latency)
            self.metrics.observe_prediction(acq.region, out.version, f.mean_confidence)
        return Predicted(raster, out, prediction, feature_record(acq, f, out.version))

    # -- monitor + trigger -----------------------------------------------------------------------------------
    def calibration(self) -> dict[str, Any]:
        """The source-calibrated monitor state every region starts from (stored beside the source model)."""
        if self._calibration is None:
            self._calibration = json.loads(self.registry.store.get(CALIBRATION_KEY))
        return self._calibration

    def new_monitor(self) -> RegionMonitor:
        """A calibrated monitor for a region seen for the first time."""
        monitor = RegionMonitor(self.monitor_config)
        monitor.load_state_dict(self.calibration())
        monitor.reset()
        return monitor

    def observe(
        self,
        acq: Acquisition,
        features: FeatureStats,
        monitor: RegionMonitor,
        trigger: Trigger,
        recent: Sequence[tuple[str, str]],
    ) -> Observed:
        """Update the region's monitor; turn a covariate-drift alarm into an adaptation job when due.

        ``recent`` lists the region's buffered tiles as (acquisition id, object href): the job carries those that
        arrived since the drift was detected (tiles from before the change would adapt the model to the old
        distribution), and the trigger waits until there are enough of them.
        """
        t0 = time.perf_counter()
        update = monitor.update(features_from_record(features), features.model_version)
        if monitor.detected_at is not None:
            recent = list(recent)[-(monitor.tiles_seen - monitor.detected_at + 1) :]
        trigger.observe(acq.region)
        drift = None
        if update.fired:
            signal = max(update.fired, key=lambda s: update.scores[s] / max(update.thresholds[s], 1e-12))
            drift = DriftEvent(
                region=acq.region,
                acquisition_id=acq.id,
                tiles_seen=monitor.tiles_seen,
                signal=signal,
                score=update.scores[signal],
                threshold=update.thresholds[signal],
                fired=update.fired,
                covariate=update.covariate_shift,
                scores=dict(update.scores),
            )
        decision = trigger.decide(
            acq.region,
            drifted=update.newly_detected or bool(update.fired),
            covariate=update.covariate_shift,
            buffered=len(recent),
            adapted=features.model_version > 0,
        )
        job = None
        if decision.adapt and drift is not None:
            job = AdaptationJob(
                job_id=f"adapt-{acq.id}",
                region=acq.region,
                base_version=features.model_version,
                method=self.adaptation.method_for(acq.region).method,
                tile_ids=tuple(i for i, _ in recent),
                tile_hrefs=tuple(h for _, h in recent),
                trigger=drift,
            )
        if self.metrics is not None:
            self.metrics.observe_stage("observe", time.perf_counter() - t0)
            self.metrics.observe_drift(
                acq.region, update.scores, update.thresholds, update.fired, newly_detected=update.newly_detected
            )
        return Observed(update, drift, decision, job)

    # -- adapt + gate + publish ------------------------------------------------------------------------------
    def label_shift(self, source_outputs: Sequence[TileOutput]) -> tuple[float, ...] | None:
        """BBSE estimate of the region's class mix from the source model's predictions on the job's tiles.

        Uses the source confusion matrix stored with the calibration (``None`` when it was calibrated without
        labels). The estimate is the gate's reference class mix; the gate decides whether to trust it.
        """
        stored = self.calibration().get("label_shift")
        if not stored or not source_outputs:
            return None
        shares = np.mean([o.features.class_shares for o in source_outputs], axis=0)
        return BBSE(np.asarray(stored["confusion"], dtype=np.float64)).estimate(shares).as_tuple()

    def shifted_from_source(self, source_outputs: Sequence[TileOutput]) -> bool:
        """Whether the job's tiles, seen by the source model, show covariate shift against the source calibration.

        A region on an adapted version raises a new alarm when its data moves away from what that version was
        adapted to; if the tiles now look like source data (no covariate evidence against the source-calibrated
        monitor), the right model is the source model again, not a further adaptation.
        """
        monitor = self.new_monitor()
        updates = [monitor.update(o.features, 0) for o in source_outputs]
        if not any(any(u.scores.values()) for u in updates):
            return True  # fewer tiles than one test window: no evidence either way, keep adapting
        return any(u.covariate_shift for u in updates)

    def adapt(self, job: AdaptationJob, tiles: Sequence[BufferedTile]) -> Adapted:
        """Adapt the job's base version on ``tiles``, gate it, publish it (rejected versions are kept, flagged)."""
        t0 = time.perf_counter()
        try:
            source_outputs = self.predictor.predict(job.region, [t.image for t in tiles], version=0)
            if job.label_shift is None:
                job = job.model_copy(update={"label_shift": self.label_shift(source_outputs)})
            # every version is the source model adapted once on the region's recent tiles: no compounding of
            # adaptations, and a region whose shift went away goes back to the source weights
            source, manifest = self.registry.load(job.region, 0)
            if job.base_version != 0 and not self.shifted_from_source(source_outputs):
                outcome = reset_to_source(job, source, manifest, tiles)
            else:
                current = None if job.base_version == 0 else self.registry.load(job.region, job.base_version)[0]
                outcome = run_adaptation(job, source, manifest, tiles, self.adaptation, current=current)
            version = self.registry.publish(outcome.weights, outcome.manifest)
        except Exception:
            if self.metrics is not None:
                self.metrics.observe_adaptation(job.region, job.method, "failed", time.perf_counter() - t0)
            raise
        if self.metrics is not None:
            elapsed = time.perf_counter() - t0
            if outcome.gate.accepted:
                self.metrics.observe_adaptation(job.region, outcome.manifest.method, "accepted", elapsed)
            else:
                self.metrics.observe_adaptation(job.region, outcome.manifest.method, "rejected", elapsed)
        return Adapted(version, outcome.gate)

    def deploy(self, version: ModelVersion) -> RolloutEvent | None:
        """Roll an accepted version out; rejected versions are never deployed."""
        if not version.accepted:
            return None
        event = self.deployer.rollout(version.region, version.version)
        if self.metrics is not None:
            self.metrics.observe_rollout(event)
        return event


def calibrate_monitor(
    predictor: Predictor,
    images: Sequence[npt.NDArray[np.uint8]],
    config: MonitorConfig,
    seed: int = 0,
    masks: Sequence[npt.NDArray[np.uint8]] | None = None,
) -> dict[str, Any]:
    """Calibrate a monitor on held-out source tiles predicted by the source model; return its state.

    With ``masks`` (labels of the same tiles), the state also carries the source model's pixel confusion matrix
    under ``label_shift.confusion`` (``[pred, true]`` counts): what BBSE needs to estimate a region's class mix.
    """
    outs = predictor.predict("source", list(images), version=0)
    feats = [o.features for o in outs]
    half = len(feats) // 2
    monitor = RegionMonitor(config)
    monitor.calibrate(feats[:half], feats[half:], seed=seed)
    state = monitor.state_dict()
    if masks is not None:
        if len(masks) != len(outs):
            raise ValueError(f"{len(masks)} masks for {len(outs)} calibration tiles")
        k = feats[0].class_shares.shape[0]
        cm = sum(confusion_matrix(o.class_map, m, k, IGNORE_INDEX) for o, m in zip(outs, masks, strict=True))
        state["label_shift"] = {"confusion": np.asarray(cm).T.tolist()}  # truth rows -> [pred, true]
    return state
