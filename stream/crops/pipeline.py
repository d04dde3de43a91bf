"""The crop loop's stages, held once: read and validate a series, predict and featurize, adapt, gate and publish.

A runner (``stream.crops.runner``) moves parcels and per-region state between these calls and never orders
stages itself:

* :meth:`CropPipeline.read`: a ``SeriesAcquisition`` (its ``.npz`` read through the injected reader, checksum,
  dates and pixels checked) or a ``ParcelSeries`` (validated) -> a label-free ``ParcelSeries``; any
  ``TerradaptError`` becomes a ``DeadLetter`` with the error's reason;
* :meth:`CropPipeline.predict`: a batch of a region's parcels through the region's current version -> predicted
  classes and the per-parcel drift vectors (``profile``, ``radiometry``, ``prediction``);
* :meth:`CropPipeline.adapt`: a job on the region's recent parcels: the method adapts a copy of the *source*
  model on the older parcels of the buffer, the crop gate compares the candidate with the current version on
  the latest ones (not adapted on), and an accepted candidate is published and becomes the region's version.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from adapters.crops.gate import CropGate
from adapters.crops.registry import create_crop_adapter
from adapters.trigger import Trigger, TriggerState
from monitoring.series_features import prediction_features, series_features
from monitoring.series_monitor import SeriesMonitor, SeriesMonitorConfig, SeriesUpdate
from serving.crop_registry import CropRegistry
from serving.store import TileReader
from stream.crops.config import CropLoopConfig
from stream.topics import Topics
from terradapt.crops.batch import iter_batches, to_batch
from terradapt.crops.checkpoint import CropManifest, encode_crop
from terradapt.crops.model import CropModel
from terradapt.crops.records import SeriesAcquisition
from terradapt.crops.series import ParcelSeries, SeriesSpec, validate_series
from terradapt.errors import TerradaptError
from terradapt.records import DeadLetter, DriftEvent, ModelVersion

__all__ = [
    "CropAdaptation",
    "CropPipeline",
    "CropPrediction",
    "ParcelObservation",
    "calibrated_monitor",
    "observe_parcel",
    "series_vectors",
]

Array = npt.NDArray[np.float64]
#: the topic dead letters of the in-process crop loop name: the crop worker's input topic under the default prefix
SERIES_TOPIC = Topics.with_prefix("terradapt.").crop_series


@dataclass(frozen=True)
class CropPrediction:
    """A batch of one region's parcels through one model version."""

    region: str
    version: int
    predicted: npt.NDArray[np.int64]
    confidence: npt.NDArray[np.float64]
    vectors: dict[str, Array]


@dataclass(frozen=True)
class CropAdaptation:
    """What one adaptation job did: the gate's decision, and the version it published (None when rejected)."""

    region: str
    job_id: str
    method: str
    base_version: int
    accepted: bool
    reasons: tuple[str, ...]
    metrics: dict[str, float]
    date_offset: float
    seconds: float
    version: ModelVersion | None
    parcels_seen: int = 0  # the region's parcels when the job started (set by the runner)


@torch.no_grad()
def series_vectors(
    model: CropModel, parcels: Sequence[ParcelSeries], *, pixels: int = 16, seed: int = 0
) -> tuple[torch.Tensor, dict[str, Array]]:
    """(logits (N, K), signal -> (N, d) drift vectors) of parcels under ``model`` (eval mode)."""
    model.eval()
    logits = torch.cat([model(b) for b, _ in iter_batches(parcels, 256, pixels=pixels, seed=seed)])
    signals = series_features(parcels).as_dict()
    return logits, {**signals, "prediction": prediction_features(logits.numpy())}


class CropPipeline:
    """The stages of the crop loop over an injected registry and object reader.

    Args:
        config: The ``[crops]`` settings.
        registry: Crop model versions (the source model published as version 0).
        reader: Reads a ``SeriesAcquisition``'s ``href`` (memory://, file://, s3://...).

    """

    def __init__(self, config: CropLoopConfig, registry: CropRegistry, reader: TileReader | None = None) -> None:
        self.config = config
        self.registry = registry
        self.reader = reader
        self.gate = CropGate(config.gate)
        self._source, self.source_manifest = registry.load("source", 0)
        self._models: dict[str, tuple[int, CropModel]] = {}  # region -> its current version (one per region)
        self.spec = SeriesSpec(bands=self.source_manifest.bands, max_nan_share=config.max_nan_share)

    # -- read ------------------------------------------------------------------------------------------------
    def read(self, item: SeriesAcquisition | ParcelSeries) -> ParcelSeries | DeadLetter:
        """The validated, label-free series of an item, or its dead letter (the reason is the error's)."""
        try:
            return self.load(item)
        except TerradaptError as exc:
            if isinstance(item, SeriesAcquisition):
                payload, key = item.to_json().decode(), item.region
            else:
                payload, key = f"ParcelSeries {item.parcel_id} of {item.region}", item.region
            return DeadLetter(
                topic=SERIES_TOPIC, reason=exc.reason, error=str(exc)[:500], payload=payload, key=key, stage="ingest"
            )

    def load(self, item: SeriesAcquisition | ParcelSeries) -> ParcelSeries:
        """The validated, label-free series of an item (its array file read through the reader).

        Raises:
            TerradaptError: no reader, the object cannot be read, or the series is invalid (typed: the reason).

        """
        if isinstance(item, SeriesAcquisition):
            if self.reader is None:
                raise TerradaptError(f"no object reader configured to read {item.href}")
            series = item.read(self.reader.get(item.href), max_nan_share=self.config.max_nan_share)
        else:
            series = validate_series(item, self.spec)
        # the loop is label-free: a label that travels with a series (synthetic data, BreizhCrops) is dropped here
        return dataclasses.replace(series, label=-1)

    # -- predict ---------------------------------------------------------------------------------------------
    def model(self, region: str) -> tuple[int, CropModel]:
        """(version, model) the region serves now (loaded once per version)."""
        version = self.registry.current(region)
        if version == 0:
            return 0, self._source
        cached = self._models.get(region)
        if cached is None or cached[0] != version:
            cached = (version, self.registry.load(region, version)[0])
            self._models[region] = cached
        return cached

    def predict(self, region: str, parcels: Sequence[ParcelSeries], seed: int = 0) -> CropPrediction:
        """Predict a batch of the region's parcels with its current version; compute their drift vectors."""
        version, model = self.model(region)
        logits, vectors = series_vectors(model, parcels, pixels=self.config.pixels, seed=seed)
        probs = logits.softmax(dim=1)
        return CropPrediction(
            region=region,
            version=version,
            predicted=probs.argmax(dim=1).numpy().astype(np.int64),
            confidence=probs.max(dim=1).values.numpy().astype(np.float64),
            vectors=vectors,
        )

    def calibration_vectors(self, parcels: Sequence[ParcelSeries]) -> dict[str, Array]:
        """Drift vectors of held-out source parcels under the source model, shuffled with ``config.seed``.

        What every monitor calibrates on (``calibrated_monitor``); the crop registry stores them for the workers.
        """
        order = np.random.default_rng(self.config.seed).permutation(len(parcels))
        shuffled = [parcels[int(i)] for i in order]
        return series_vectors(self._source, shuffled, pixels=self.config.pixels, seed=self.config.seed)[1]

    # -- adapt -----------------------------------------------------------------------------------------------
    def adapt(self, region: str, buffer: Sequence[ParcelSeries], job_id: str) -> CropAdaptation:
        """Adapt the source model on the buffer's older parcels, gate on its latest, publish when accepted.

        Raises:
            ValueError: the buffer holds no more parcels than the gate keeps for itself.

        """
        cfg = self.config
        if len(buffer) <= cfg.gate_parcels:
            raise ValueError(f"{len(buffer)} buffered parcels: need more than gate_parcels={cfg.gate_parcels}")
        start = time.perf_counter()
        base_version, current = self.model(region)
        adapt_on, judge_on = list(buffer[: -cfg.gate_parcels]), list(buffer[-cfg.gate_parcels :])
        prior = self.source_manifest.class_prior
        adapter = create_crop_adapter(
            cfg.method,
            self._source,
            cfg.method_config,
            class_prior=torch.tensor(prior, dtype=torch.float32) if prior else None,
        )
        candidate = adapter.adapt(
            b for b, _ in iter_batches(adapt_on, cfg.batch_parcels, pixels=cfg.pixels, seed=cfg.seed)
        )
        batches = [to_batch(judge_on, pixels=cfg.pixels, seed=cfg.seed + 1)]
        result = self.gate.check(candidate, current, batches)
        published: ModelVersion | None = None
        if result.accepted:
            weights, manifest_json = encode_crop(candidate, self.source_manifest)
            manifest = CropManifest.model_validate_json(manifest_json).model_copy(
                update={
                    "region": region,
                    "parent": base_version,
                    "method": cfg.method,
                    "job_id": job_id,
                    "gate_accepted": True,
                    "gate_reasons": (),
                    "gate_metrics": dict(result.metrics),
                    "metrics": {"date_offset": float(candidate.date_offset), "adapted_parcels": len(adapt_on)},
                }
            )
            published = self.registry.publish(weights, manifest)
            self.registry.set_current(region, published.version)
        return CropAdaptation(
            region=region,
            job_id=job_id,
            method=cfg.method,
            base_version=base_version,
            accepted=result.accepted,
            reasons=tuple(result.reasons),
            metrics=dict(result.metrics),
            date_offset=float(candidate.date_offset),
            seconds=time.perf_counter() - start,
            version=published,
        )


def calibrated_monitor(config: SeriesMonitorConfig, vectors: Mapping[str, Array], seed: int = 0) -> SeriesMonitor:
    """A series monitor calibrated on the first and second halves of ``vectors`` (``calibration_vectors``).

    Raises:
        CalibrationError: a signal is missing, or a half is shorter than a window.

    """
    monitor = SeriesMonitor(config)
    half = min(len(v) for v in vectors.values()) // 2
    monitor.calibrate({k: v[:half] for k, v in vectors.items()}, {k: v[half:] for k, v in vectors.items()}, seed=seed)
    return monitor


@dataclass(frozen=True)
class ParcelObservation:
    """What one predicted parcel did: the monitor's update, the drift event of its alarm, the trigger's decision."""

    update: SeriesUpdate
    drift: DriftEvent | None  # None when no signal fires at this parcel
    adapt: bool
    reason: str


def observe_parcel(
    monitor: SeriesMonitor,
    trigger: Trigger,
    trigger_state: TriggerState,
    vectors: Mapping[str, Array],
    *,
    version: int,
    region: str,
    acquisition_id: str,
    parcels: int,
    buffered: int,
) -> ParcelObservation:
    """Monitor -> drift event -> trigger for one parcel of a region (``parcels``: the region's count with it).

    The one order both runners follow; ``buffered`` is the region's buffer with this parcel in it.
    """
    update = monitor.update(vectors, version)
    drift = None
    if update.fired:
        top = max(update.fired, key=lambda s: update.scores[s] / max(update.thresholds[s], 1e-12))
        drift = DriftEvent(
            region=region,
            acquisition_id=acquisition_id,
            tiles_seen=parcels,
            signal=top,
            score=update.scores[top],
            threshold=update.thresholds[top],
            fired=update.fired,
            covariate=update.covariate_shift,
            scores=dict(update.scores),
        )
    Trigger.observe(trigger_state)
    decision = trigger.decide(
        trigger_state,
        drifted=bool(update.fired),
        covariate=update.covariate_shift,
        buffered=buffered,
        adapted=version != 0,
    )
    return ParcelObservation(update, drift, decision.adapt, decision.reason)


def as_mapping(vectors: Mapping[str, Array], index: int) -> dict[str, Array]:
    """Signal -> (d,) vector of parcel ``index`` of a batch."""
    return {name: values[index] for name, values in vectors.items()}
