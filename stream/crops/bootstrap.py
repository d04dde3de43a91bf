"""Put a source crop model and its drift calibration in a crop registry, and publish parcel series to the stream.

``terradapt crops init`` and ``terradapt crops ingest`` call these; tests call them on the real services too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaProducer

from serving.crop_registry import CropRegistry
from serving.store import BlobStore
from stream.crops.config import CropLoopConfig
from stream.crops.pipeline import CropPipeline, calibrated_monitor
from terradapt.crops.checkpoint import CropManifest
from terradapt.crops.records import SeriesAcquisition, series_acquisition
from terradapt.crops.series import ParcelSeries, SeriesSpec, decode_series, encode_series
from terradapt.errors import TerradaptError

__all__ = ["IngestedSeries", "init_crop_registry", "publish_series", "read_series_files"]


def init_crop_registry(
    registry: CropRegistry,
    weights: bytes,
    manifest: CropManifest,
    calibration: Sequence[ParcelSeries],
    config: CropLoopConfig,
) -> int:
    """Publish the source model as version 0 and store the drift vectors of ``calibration`` under it.

    ``calibration`` are held-out parcels of the source countries (never trained on). Returns how many calibrated
    the monitor.

    Raises:
        CalibrationError: too few parcels for the configured monitor windows (each half needs a window).

    """
    registry.publish_source(weights, manifest)
    pipeline = CropPipeline(config, registry)
    vectors = pipeline.calibration_vectors([pipeline.load(p) for p in calibration])
    calibrated_monitor(config.monitor, vectors, seed=config.seed)  # refuses too few parcels before storing
    registry.put_calibration(vectors)
    return len(calibration)


@dataclass(frozen=True)
class IngestedSeries:
    """What ``publish_series`` did: the items published, and the files refused with their reason."""

    published: list[SeriesAcquisition]
    refused: list[tuple[str, str]]


def read_series_files(paths: Sequence[Path], region: str, spec: SeriesSpec | None = None) -> list[ParcelSeries]:
    """``.npz`` files (``encode_series``) as series of ``region`` (parcel id = the file's stem).

    Raises:
        InvalidSeriesError: a file is not a valid series.

    """
    return [decode_series(p.read_bytes(), parcel_id=p.stem, region=region, spec=spec) for p in paths]


def publish_series(
    series: Sequence[ParcelSeries],
    *,
    country: str,
    store: BlobStore,
    producer: KafkaProducer,
    topic: str,
) -> IngestedSeries:
    """Upload each series' ``.npz`` (``<region>/<parcel>.npz``), then publish its STAC item keyed by region.

    Each send waits for the broker's acknowledgement; the object exists before any worker can read its item.
    """
    published: list[SeriesAcquisition] = []
    refused: list[tuple[str, str]] = []
    for s in series:
        data = encode_series(s)
        try:
            item = series_acquisition(
                s, href=store.put(f"{s.region}/{s.parcel_id}.npz", data), data=data, country=country
            )
        except (TerradaptError, ValueError) as exc:
            refused.append((s.parcel_id, str(exc)))
            continue
        producer.send(topic, key=s.region.encode(), value=item.to_json()).get(timeout=30)
        published.append(item)
    return IngestedSeries(published, refused)
