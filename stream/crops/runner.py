"""The in-process crop loop: per region, parcels in stream order through the stages of ``CropPipeline``.

For every region the runner keeps one ``CropRegionState``: the calibrated series monitor, the trigger's counters,
the recent valid parcels (bounded buffer) and the parcels waiting to be predicted together. A parcel goes:

    read/validate (dead letter on error) -> wait for a batch of ``batch_parcels`` -> predict with the region's
    current version -> drift vectors -> monitor -> trigger -> (job) adapt on the buffer -> gate -> publish ->
    the region serves the new version from its next batch on

Everything it keeps grows with the number of regions, not with the stream: buffers and monitor windows are
bounded; the run's summary keeps events (drift, jobs, dead letters), not parcels (``on_parcel`` sees each one).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from adapters.trigger import Trigger, TriggerState
from monitoring.metrics import ServiceMetrics
from monitoring.series_monitor import SeriesMonitor
from serving.crop_registry import CropRegistry
from serving.store import TileReader
from stream.crops.config import CropLoopConfig
from stream.crops.pipeline import (
    CropAdaptation,
    CropPipeline,
    CropPrediction,
    as_mapping,
    calibrated_monitor,
    observe_parcel,
)
from terradapt.crops.records import SeriesAcquisition
from terradapt.crops.series import ParcelSeries
from terradapt.records import DeadLetter, DriftEvent

__all__ = ["CropLoop", "CropRegionState", "CropRunResult", "ParcelLog"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ParcelLog:
    """One parcel through the loop (what ``on_parcel`` receives)."""

    region: str
    index: int
    parcel_id: str
    version: int
    predicted: int
    fired: tuple[str, ...]
    score_ratio: float
    scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    p_value: float = 1.0


@dataclass
class CropRegionState:
    """One region's loop state: monitor, trigger counters, recent parcels, parcels waiting for a batch."""

    monitor: SeriesMonitor
    trigger: TriggerState
    buffer: deque[ParcelSeries]
    pending: list[tuple[ParcelSeries, float]] = field(default_factory=list)
    parcels: int = 0
    jobs: int = 0


@dataclass
class CropRunResult:
    """What a run did, per event (never per parcel)."""

    parcels: dict[str, int] = field(default_factory=dict)
    first_detection: dict[str, int] = field(default_factory=dict)
    drift_events: list[DriftEvent] = field(default_factory=list)
    adaptations: list[CropAdaptation] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    current: dict[str, int] = field(default_factory=dict)

    def published(self, region: str | None = None) -> list[int]:
        """Versions published (of ``region``, or of every region)."""
        return [
            a.version.version
            for a in self.adaptations
            if a.version is not None and (region is None or a.region == region)
        ]


class CropLoop:
    """The in-process runner of the crop loop.

    Args:
        config: The ``[crops]`` settings.
        registry: Crop model versions (the source model published as version 0).
        calibration: Held-out source parcels (never trained on): their drift vectors under the source model,
            shuffled with ``config.seed`` and cut in two halves, calibrate every region's monitor.
        reader: Reads a ``SeriesAcquisition``'s ``href``; not needed for ``ParcelSeries`` items.
        metrics: Prometheus metrics on an injected registry (None: none).
        on_parcel: Called with every predicted parcel's log.

    """

    def __init__(
        self,
        config: CropLoopConfig,
        registry: CropRegistry,
        calibration: Sequence[ParcelSeries],
        *,
        reader: TileReader | None = None,
        metrics: ServiceMetrics | None = None,
        on_parcel: Callable[[ParcelLog], None] | None = None,
    ) -> None:
        self.config = config
        self.pipeline = CropPipeline(config, registry, reader)
        self.trigger = Trigger(config.trigger)
        self.metrics = metrics
        self.on_parcel = on_parcel
        vectors = self.pipeline.calibration_vectors(calibration)
        self._calibrated = calibrated_monitor(config.monitor, vectors, seed=config.seed)
        self.regions: dict[str, CropRegionState] = {}
        self.result = CropRunResult()

    def state(self, region: str) -> CropRegionState:
        """The region's state (created, with a freshly calibrated monitor, on first sight)."""
        if region not in self.regions:
            self.regions[region] = CropRegionState(
                monitor=self._calibrated.fresh(),
                trigger=TriggerState(),
                buffer=deque(maxlen=self.config.buffer_parcels),
            )
        return self.regions[region]

    def run(self, items: Iterable[SeriesAcquisition | ParcelSeries]) -> CropRunResult:
        """Process every item in order, then the parcels still waiting for a batch; return the run's summary."""
        for item in items:
            self.process(item)
        self.flush()
        return self.result

    def process(self, item: SeriesAcquisition | ParcelSeries) -> None:
        """One item: dead letter, or queued for its region's next batch (predicted once the batch is full)."""
        start = time.perf_counter()
        series = self.pipeline.read(item)
        if isinstance(series, DeadLetter):
            self.result.dead_letters.append(series)
            if self.metrics is not None:
                self.metrics.observe_dead_letter(series.reason)
                self.metrics.observe_tile(series.key or "other", time.perf_counter() - start, "dead_letter")
            return
        state = self.state(series.region)
        state.pending.append((series, start))
        if len(state.pending) >= self.config.batch_parcels:
            self._predict(series.region, state)

    def flush(self) -> None:
        """Predict every region's waiting parcels (end of a stream)."""
        for region, state in self.regions.items():
            if state.pending:
                self._predict(region, state)

    def _predict(self, region: str, state: CropRegionState) -> None:
        parcels = [s for s, _ in state.pending]
        starts = [t for _, t in state.pending]
        state.pending = []
        prediction = self.pipeline.predict(region, parcels, seed=self.config.seed + state.parcels)
        for i, series in enumerate(parcels):
            self._observe(region, state, series, prediction, i)
            if self.metrics is not None:
                self.metrics.observe_tile(region, time.perf_counter() - starts[i])
        self.result.current[region] = self.pipeline.registry.current(region)

    def _observe(
        self, region: str, state: CropRegionState, series: ParcelSeries, prediction: CropPrediction, i: int
    ) -> None:
        state.parcels += 1
        self.result.parcels[region] = state.parcels
        state.buffer.append(series)
        seen = observe_parcel(
            state.monitor,
            self.trigger,
            state.trigger,
            as_mapping(prediction.vectors, i),
            version=prediction.version,
            region=region,
            acquisition_id=f"{region}_{series.parcel_id}",
            parcels=state.parcels,
            buffered=len(state.buffer),
        )
        update = seen.update
        if self.metrics is not None:
            self.metrics.observe_prediction(region, prediction.version, float(prediction.confidence[i]))
            self.metrics.observe_drift(
                region, update.scores, update.thresholds, update.fired, newly_detected=update.newly_detected
            )
        if self.on_parcel is not None:
            self.on_parcel(
                ParcelLog(
                    region,
                    state.parcels,
                    series.parcel_id,
                    prediction.version,
                    int(prediction.predicted[i]),
                    update.fired,
                    update.max_ratio,
                    dict(update.scores),
                    dict(update.thresholds),
                    update.p_value,
                )
            )
        if update.newly_detected and seen.drift is not None:
            self.result.first_detection.setdefault(region, state.parcels)
            self.result.drift_events.append(seen.drift)
        if seen.adapt:
            self._adapt(region, state)

    def _adapt(self, region: str, state: CropRegionState) -> None:
        state.jobs += 1
        job_id = f"{region}-crops-job-{state.jobs}"
        previous = self.pipeline.registry.current(region)
        outcome = dataclasses.replace(
            self.pipeline.adapt(region, list(state.buffer), job_id), parcels_seen=state.parcels
        )
        self.result.adaptations.append(outcome)
        if self.metrics is not None:
            self.metrics.observe_adaptation(
                region, outcome.method, "accepted" if outcome.accepted else "rejected", outcome.seconds
            )
            if outcome.version is not None:
                self.metrics.set_current_version(region, outcome.version.version, previous)
