"""Delayed labels on Kafka: join each reference mask with the stored prediction of its acquisition.

A label may arrive hours after its acquisition, after restarts and rollouts: the prediction COG in object storage
carries the model version that made it (GeoTIFF tags), so the join needs no in-memory state. Per region, the
rolling windows of confusion matrices per model version live in a changelog-backed faust table (the
``DelayedLabelTracker`` state), and every join updates the accuracy and mIoU gauges of that region and version.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from rasterio.io import MemoryFile

from monitoring.accuracy import DelayedLabelTracker
from stream.kafka.services import Services
from stream.kafka.worker import Offload, Outgoing, dead_letter
from terradapt.classes import flair_to_13
from terradapt.errors import InvalidPayloadError, TerradaptError
from terradapt.raster import RasterSpec, read_raster
from terradapt.records import LabelRecord, parse_record

_MASK_SPEC = RasterSpec(band_count=1, require_crs=False, max_nodata_fraction=1.0)
WINDOW_TILES = 50


def _prediction(data: bytes) -> tuple[np.ndarray, int]:
    with MemoryFile(data) as mem, mem.open() as src:
        version = int(src.tags().get("model_version", "-1"))
        return src.read(1), version


class LabelHandler:
    """Body of the labels agent (independent of faust; tables are mappings of region -> JSON bytes)."""

    def __init__(self, services: Services, run: Offload, accuracy: Any, num_classes: int) -> None:
        self.s = services
        self.run = run
        self.accuracy = accuracy
        self.num_classes = num_classes

    def dead(self, reason: str, error: str, value: bytes, key: str | None) -> Outgoing:
        """The dead letter of a label payload (counted in the metrics)."""
        if self.s.metrics is not None:
            self.s.metrics.observe_dead_letter(reason)
        return dead_letter(self.s.topics.labels, "labels", reason, error, value, key)

    async def handle(self, key: bytes | None, value: bytes) -> list[Outgoing]:
        """Join one label; return dead letters when it cannot be joined."""
        skey = key.decode("utf-8", errors="replace") if key else None
        try:
            label = parse_record(LabelRecord, value)
        except InvalidPayloadError as exc:
            return [self.dead(exc.reason, str(exc), value, skey)]
        predictions = self.s.pipeline.predictions
        if predictions is None:
            return [self.dead("missing_object", "this worker stores no predictions", value, skey)]
        try:
            mask_raster = await self.run(lambda: read_raster(self.s.reader.get(label.href), _MASK_SPEC))
            pred_bytes = await self.run(lambda: predictions.get(f"{label.region}/{label.acquisition_id}.tif"))
        except TerradaptError as exc:
            return [self.dead(exc.reason, str(exc), value, skey)]
        class_map, version = _prediction(pred_bytes)
        mask = mask_raster.data[0].astype(np.uint8)
        if label.encoding == "flair19":
            mask = flair_to_13(mask)
        tracker = DelayedLabelTracker(self.num_classes, WINDOW_TILES)
        if label.region in self.accuracy:
            tracker.load_state_dict(json.loads(self.accuracy[label.region]))
        tracker.record_prediction(label.acquisition_id, label.region, version, class_map=class_map)
        join = tracker.add_label(label.acquisition_id, mask)
        self.accuracy[label.region] = json.dumps(tracker.state_dict()).encode()
        metrics = self.s.metrics
        if metrics is not None:
            metrics.observe_label(label.region, join.outcome)
            if join.window is not None:
                w = join.window
                metrics.observe_accuracy(w.region, w.version, w.accuracy, w.miou, w.tiles)
        if join.outcome == "invalid":
            return [self.dead("invalid_tile", join.detail or "label does not fit the prediction", value, skey)]
        return []
