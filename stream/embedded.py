"""Embedded runner: the whole loop in one process with in-memory state, no services.

Acquisitions are fed in order; each goes through the shared pipeline. An adaptation job runs right away (there is
no event loop to block here), and an accepted version is rolled out for its region only. Labels, when the dataset
has them, are joined after prediction to measure per-region, per-version accuracy (the delayed-label path).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from adapters.buffer import BufferedTile, TileBuffer
from adapters.trigger import Trigger, TriggerConfig
from monitoring.accuracy import DelayedLabelTracker
from monitoring.monitor import RegionMonitor
from stream.pipeline import Adapted, Pipeline
from terradapt.classes import IGNORE_INDEX
from terradapt.errors import TerradaptError
from terradapt.metrics import confusion_matrix, miou
from terradapt.records import Acquisition, DeadLetter, DriftEvent, RolloutEvent


@dataclass(frozen=True)
class StreamItem:
    """One acquisition with its encoded GeoTIFF and, optionally, its (delayed) label."""

    acquisition: Acquisition
    data: bytes
    mask: npt.NDArray[np.uint8] | None = None


@dataclass
class TileLog:
    """What happened to one tile (for the table and the plots)."""

    region: str
    index: int
    acquisition_id: str
    version: int
    score_ratio: float
    scores: dict[str, float]
    thresholds: dict[str, float]
    fired: tuple[str, ...]


@dataclass
class RunResult:
    """Everything the embedded run produced."""

    tiles: list[TileLog] = field(default_factory=list)
    drift_events: list[DriftEvent] = field(default_factory=list)
    adaptations: list[Adapted] = field(default_factory=list)
    rollouts: list[RolloutEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    confusion: dict[tuple[str, int], npt.NDArray[np.int64]] = field(default_factory=dict)
    first_detection: dict[str, int] = field(default_factory=dict)

    def region_miou(self, region: str, version: int) -> float | None:
        """MIoU of a version on the region's labelled tiles it predicted (None if it predicted none)."""
        cm = self.confusion.get((region, version))
        return None if cm is None else miou(cm)


class EmbeddedRunner:
    """Plain in-process loop over the shared pipeline."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        trigger: TriggerConfig | None = None,
        buffer_capacity: int = 16,
        labels_in_gate: bool = False,
        label_delay: int = 3,
        on_tile: Callable[[TileLog], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.trigger = Trigger(trigger)
        self.buffer = TileBuffer(buffer_capacity)
        self.monitors: dict[str, RegionMonitor] = {}
        self.labels_in_gate = labels_in_gate
        self.on_tile = on_tile
        self.result = RunResult()
        self._counts: dict[str, int] = {}
        # delayed labels: the dataset's masks reach the accuracy metrics ``label_delay`` tiles after prediction
        self.label_delay = label_delay
        self._labels: deque[tuple[str, npt.NDArray[np.uint8]]] = deque()
        self._tracker: DelayedLabelTracker | None = None

    def _label(
        self,
        acq_id: str,
        region: str,
        version: int,
        class_map: npt.NDArray[np.uint8],
        mask: npt.NDArray[np.uint8],
        num_classes: int,
    ) -> None:
        if self.pipeline.metrics is None:
            return
        if self._tracker is None:
            self._tracker = DelayedLabelTracker(num_classes, window=50)
        self._tracker.record_prediction(acq_id, region, version, class_map=class_map)
        self._labels.append((acq_id, mask))
        while len(self._labels) > self.label_delay:
            self.deliver_one()

    def deliver_one(self) -> None:
        """Join the oldest pending label with its prediction and update the accuracy metrics."""
        metrics = self.pipeline.metrics
        if not self._labels or self._tracker is None or metrics is None:
            return
        acq_id, mask = self._labels.popleft()
        join = self._tracker.add_label(acq_id, mask)
        if join.window is not None:
            w = join.window
            metrics.observe_label(w.region, join.outcome)
            metrics.observe_accuracy(w.region, w.version, w.accuracy, w.miou, w.tiles)

    def monitor(self, region: str) -> RegionMonitor:
        """The region's monitor, created calibrated on first use."""
        if region not in self.monitors:
            self.monitors[region] = self.pipeline.new_monitor()
        return self.monitors[region]

    def run(self, items: Iterable[StreamItem]) -> RunResult:
        """Process every item; bad input becomes a dead letter and the loop goes on."""
        for item in items:
            self.step(item)
        while self._labels:  # the last labels arrive after the stream
            self.deliver_one()
        return self.result

    def step(self, item: StreamItem) -> None:
        """One acquisition through every stage."""
        acq = item.acquisition
        started = time.perf_counter()
        try:
            raster = self.pipeline.read(acq, item.data)
        except TerradaptError as exc:
            self.pipeline.rejected(acq.region, exc, started)
            self.result.dead_letters.append(
                DeadLetter(topic="acquisitions", reason=exc.reason, error=str(exc), payload=acq.to_json().decode())
            )
            return
        predicted = self.pipeline.predict(acq, raster)
        version = predicted.prediction.model_version
        if item.mask is not None:
            k = predicted.output.features.class_shares.shape[0]
            self._label(acq.id, acq.region, version, predicted.output.class_map, item.mask, k)
            cm = confusion_matrix(predicted.output.class_map, item.mask, k, IGNORE_INDEX)
            key = (acq.region, version)
            self.result.confusion[key] = self.result.confusion.get(key, np.zeros((k, k), np.int64)) + cm
        mask = item.mask if self.labels_in_gate else None
        tile = BufferedTile(acq.id, raster.data.astype(np.uint8), mask, href=acq.href)
        self.buffer.add(acq.region, tile)
        monitor = self.monitor(acq.region)
        recent = [(t.acquisition_id, t.href) for t in self.buffer.recent(acq.region)]
        observed = self.pipeline.observe(acq, predicted.features, monitor, self.trigger, recent)
        index = self._counts[acq.region] = self._counts.get(acq.region, 0) + 1
        if observed.update.newly_detected and observed.drift is not None:
            self.result.drift_events.append(observed.drift)
            self.result.first_detection.setdefault(acq.region, index)
        log = TileLog(
            acq.region,
            index,
            acq.id,
            version,
            observed.update.max_ratio,
            observed.update.scores,
            observed.update.thresholds,
            observed.update.fired,
        )
        self.result.tiles.append(log)
        self.pipeline.done(acq.region, started)
        if self.on_tile is not None:
            self.on_tile(log)
        if observed.job is not None:
            tiles = self.buffer.recent(acq.region)
            adapted = self.pipeline.adapt(observed.job, tiles)
            self.result.adaptations.append(adapted)
            event = self.pipeline.deploy(adapted.version)
            if event is not None:
                self.result.rollouts.append(event)
