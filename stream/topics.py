"""Topic layout: one topic per record type, keyed by region so one partition sees a region's records in order.

Pure names (no Kafka client): the pipeline names the topic of every record it returns, and both runners route by
these names; ``stream.kafka.topics.ensure_topics`` creates them on a broker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

#: The logical name of every topic (a field of ``Topics``).
TopicName = Literal[
    "acquisitions",
    "predictions",
    "features",
    "drift_events",
    "adaptation_jobs",
    "model_versions",
    "rollouts",
    "labels",
    "deadletter",
    "crop_series",
    "crop_predictions",
    "crop_jobs",
    "crop_labels",
]


@dataclass(frozen=True)
class Topics:
    """Names of the topics under a prefix (``terradapt.`` by default)."""

    acquisitions: str
    predictions: str
    features: str
    drift_events: str
    adaptation_jobs: str
    model_versions: str
    rollouts: str
    labels: str
    deadletter: str
    crop_series: str  # crop mapping: parcel time series (``SeriesAcquisition``), the crop worker's input
    crop_predictions: str  # one ``ParcelPrediction`` per parcel
    crop_jobs: str  # ``CropAdaptationJob``: the crop adaptation worker's input
    crop_labels: str  # delayed parcel labels (``ParcelLabel``)

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        """Every topic named ``<prefix><record-name>``."""
        return cls(**{f.name: prefix + f.name.replace("_", "-") for f in fields(cls)})

    def all(self) -> list[str]:
        """Every topic name."""
        return [getattr(self, f.name) for f in fields(self)]

    def name(self, topic: TopicName) -> str:
        """The full name of a logical topic."""
        return str(getattr(self, topic))
