"""Records of the crop loop on Kafka, after the input series item: a parcel's prediction, an adaptation job, a label.

    SeriesAcquisition (crop-series) -> ParcelPrediction (crop-predictions), DriftEvent (drift-events)
                                    -> CropAdaptationJob (crop-jobs) -> ModelVersion (model-versions)
    ParcelLabel (crop-labels)       -> the region's delayed-label accuracy

Drift events, model versions and dead letters are the segmentation loop's records on the same topics: one drift
timeline, one version history and one dead-letter topic for both tasks.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, FiniteFloat, model_validator

from terradapt.crops.records import SeriesAcquisition
from terradapt.records import DriftEvent, ObjectId, Record, Region, utcnow

__all__ = ["CropAdaptationJob", "ParcelLabel", "ParcelPrediction"]


class ParcelPrediction(Record):
    """One parcel's predicted crop class, by the region's model version of the moment."""

    acquisition_id: ObjectId
    region: Region
    parcel_id: str = Field(min_length=1, max_length=200)
    model_version: int = Field(ge=0)
    predicted: int = Field(ge=0)
    crop: str
    confidence: FiniteFloat = Field(ge=0.0, le=1.0)
    href: str | None = None  # where the prediction object is stored (delayed labels are joined with it)
    predicted_at: datetime = Field(default_factory=utcnow)


class CropAdaptationJob(Record):
    """A request to adapt a region's crop model on its recent parcels (their series items, read back from storage).

    The job's ``series`` are in stream order: the adaptation method uses the older ones, the gate judges on the
    latest ``gate_parcels`` (the crop settings of the worker that runs the job).
    """

    job_id: ObjectId
    region: Region
    base_version: int = Field(ge=0)
    method: str
    series: tuple[SeriesAcquisition, ...] = Field(min_length=2)
    trigger: DriftEvent
    created: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _one_region(self) -> CropAdaptationJob:
        others = sorted({s.region for s in self.series} - {self.region})
        if others:
            raise ValueError(f"series of other regions {others} in a job of {self.region}")
        return self


class ParcelLabel(Record):
    """A parcel's reference crop class, arriving after its prediction (field survey, farmer declaration)."""

    acquisition_id: ObjectId
    region: Region
    label: int = Field(ge=0, description="crop class index of the model's classes")
