"""Embedded runner: the whole loop in one process, no services. It moves messages and stores state, nothing else.

An in-memory bus stands where Kafka stands in the workers: each acquisition's object goes into a bounded
``MemoryStore`` (its ``memory://`` href is what the STAC item announces), the item's JSON goes on the queue, and
every message is handed to the pipeline call of its kind (``process``, ``run_job``, ``process_label``), exactly as
the faust agents and the adaptation worker do; what a call returns is routed the same way (an adaptation job is
run before the next acquisition: there is no event loop to block here). Per-region state is the same bytes the
faust tables store. Labels, when the dataset has them, become ``LabelRecord`` messages ``label_delay``
acquisitions later (the delayed-label path).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt
from affine import Affine

from monitoring.accuracy import LabelJoin
from monitoring.monitor import MonitorUpdate
from serving.store import MemoryStore
from stream.observer import NullObserver
from stream.outcome import Outcome
from stream.pipeline import Pipeline
from stream.topics import TopicName
from terradapt.metrics import miou
from terradapt.raster import Raster, raster_to_geotiff_bytes
from terradapt.records import (
    Acquisition,
    DeadLetter,
    DriftEvent,
    LabelRecord,
    ModelVersion,
    RolloutEvent,
    TilePrediction,
)


@dataclass(frozen=True)
class StreamItem:
    """One acquisition with its encoded GeoTIFF and, optionally, its (delayed) label."""

    acquisition: Acquisition
    data: bytes
    mask: npt.NDArray[np.uint8] | None = None


@dataclass
class TileLog:
    """What one tile did to its region's monitor (for the table, the plots and the dashboard)."""

    region: str
    index: int
    acquisition_id: str
    version: int
    score_ratio: float
    scores: dict[str, float]
    thresholds: dict[str, float]
    fired: tuple[str, ...]
    p_value: float = 1.0
    acquired: datetime | None = None  # capture time of the tile (plots against acquisition time)


@dataclass
class RunResult:
    """Everything the embedded run produced: the published records by topic, and the per-tile monitor log."""

    tiles: list[TileLog] = field(default_factory=list)
    predictions: list[TilePrediction] = field(default_factory=list)
    drift_events: list[DriftEvent] = field(default_factory=list)
    adaptations: list[ModelVersion] = field(default_factory=list)
    rollouts: list[RolloutEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    confusion: dict[tuple[str, int], npt.NDArray[np.int64]] = field(default_factory=dict)
    first_detection: dict[str, int] = field(default_factory=dict)

    def region_miou(self, region: str, version: int) -> float | None:
        """MIoU of a version on the region's delayed labels (None if none was joined)."""
        cm = self.confusion.get((region, version))
        return None if cm is None else miou(cm)


class RunRecorder(NullObserver):
    """The pipeline observer that writes the run's monitor log and label confusion into a ``RunResult``."""

    def __init__(self, result: RunResult, on_tile: Callable[[TileLog], None] | None = None) -> None:
        self.result = result
        self.on_tile = on_tile
        self._counts: dict[str, int] = {}

    def monitored(self, prediction: TilePrediction, update: MonitorUpdate) -> None:
        region = prediction.region
        index = self._counts[region] = self._counts.get(region, 0) + 1
        if update.newly_detected:
            self.result.first_detection.setdefault(region, index)
        log = TileLog(
            region,
            index,
            prediction.acquisition_id,
            prediction.model_version,
            update.max_ratio,
            dict(update.scores),
            dict(update.thresholds),
            update.fired,
            update.p_value,
            prediction.acquired,
        )
        self.result.tiles.append(log)
        if self.on_tile is not None:
            self.on_tile(log)

    def labelled(self, region: str, join: LabelJoin) -> None:
        if join.confusion is None or join.region is None or join.version is None:
            return
        key = (join.region, join.version)
        previous = self.result.confusion.get(key)
        self.result.confusion[key] = join.confusion if previous is None else previous + join.confusion


class EmbeddedRunner:
    """A plain in-process loop over the shared pipeline.

    Args:
        pipeline: The pipeline; its ``reader`` must read the ``objects`` store (``serving.store.MemoryReader``),
            and its observer should include ``recorder`` (``stream.observer.Observers``).
        objects: Where acquisitions and label masks are put (bounded per region, like a bucket lifecycle rule).
        recorder: Fills the run result from the pipeline's events.
        label_delay: Acquisitions between a tile and its delayed label.

    """

    def __init__(
        self, pipeline: Pipeline, objects: MemoryStore, recorder: RunRecorder, *, label_delay: int = 3
    ) -> None:
        self.pipeline = pipeline
        self.objects = objects
        self.result = recorder.result
        self.label_delay = label_delay
        self.states: dict[str, bytes] = {}
        self.label_states: dict[str, bytes] = {}
        self._queue: deque[tuple[TopicName, str, bytes]] = deque()
        self._labels: deque[tuple[str, bytes]] = deque()

    def run(self, items: Iterable[StreamItem]) -> RunResult:
        """Process every item; bad input becomes a dead letter and the loop goes on."""
        for item in items:
            self.step(item)
        while self._labels:  # the last labels arrive after the stream
            self._queue.append(("labels", *self._labels.popleft()))
        self._drain()
        return self.result

    def step(self, item: StreamItem) -> None:
        """Publish one acquisition (its object first, as ``terradapt ingest`` does), then deliver what is due."""
        acq = item.acquisition
        href = self.objects.put(f"{acq.region}/{acq.id}.tif", item.data, "image/tiff")
        acq = acq.model_copy(update={"href": href})
        self._queue.append(("acquisitions", acq.region, acq.to_json()))
        if item.mask is not None:
            self._labels.append((acq.region, self._label(acq, item.mask)))
        while len(self._labels) > self.label_delay:
            self._queue.append(("labels", *self._labels.popleft()))
        self._drain()

    def _label(self, acq: Acquisition, mask: npt.NDArray[np.uint8]) -> bytes:
        data = raster_to_geotiff_bytes(Raster(mask[None].astype(np.uint8), None, Affine.identity()))
        href = self.objects.put(f"{acq.region}/labels/{acq.id}.tif", data, "image/tiff")
        return LabelRecord(acquisition_id=acq.id, region=acq.region, href=href).to_json()

    def _drain(self) -> None:
        while self._queue:
            topic, key, payload = self._queue.popleft()
            if topic == "acquisitions":
                outcome = self.pipeline.process(payload, key, self.states.get(key))
                self._store(self.states, key, outcome)
            elif topic == "adaptation_jobs":
                outcome = self.pipeline.run_job(payload, key)
            else:
                outcome = self.pipeline.process_label(payload, key, self.label_states.get(key))
                self._store(self.label_states, key, outcome)
            self._route(outcome)

    @staticmethod
    def _store(table: dict[str, bytes], key: str, outcome: Outcome) -> None:
        if outcome.state is not None:
            table[key] = outcome.state

    def _route(self, outcome: Outcome) -> None:
        r = self.result
        for m in outcome.messages:
            record = m.record
            if m.topic == "adaptation_jobs":
                self._queue.append(("adaptation_jobs", m.key, record.to_json()))
            elif isinstance(record, TilePrediction):
                r.predictions.append(record)
            elif isinstance(record, DriftEvent):
                r.drift_events.append(record)
            elif isinstance(record, ModelVersion):
                r.adaptations.append(record)
            elif isinstance(record, RolloutEvent):
                r.rollouts.append(record)
            elif isinstance(record, DeadLetter):
                r.dead_letters.append(record)
