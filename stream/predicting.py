"""The prediction stage's two steps: the predictor call (transient failures retried) and the stored prediction.

``Pipeline.process_many`` orders them; they are here so that the flow module stays the flow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from serving.predictor import Predictor, TileOutput
from serving.store import BlobStore
from stream.observer import PipelineObserver, timed
from stream.outcome import PredictorUnavailableError
from terradapt.raster import Raster, write_cog
from terradapt.records import Acquisition, TilePrediction


def predict_with_retries(
    predictor: Predictor, region: str, rasters: list[Raster], retries: int, sleep: Callable[[float], None]
) -> list[TileOutput]:
    """The region's tiles predicted by its current model in one call; transient failures retried with backoff.

    Raises:
        PredictorUnavailableError: the predictor still failed after ``retries`` more tries.

    """
    attempts = retries + 1
    for attempt in range(attempts):
        try:
            return predictor.predict(region, [r.data.astype(np.uint8) for r in rasters])
        except (ConnectionError, TimeoutError, OSError) as exc:
            if attempt == attempts - 1:
                raise PredictorUnavailableError(f"prediction failed after {attempts} tries: {exc}") from exc
            sleep(min(2.0**attempt * 0.5, 10.0))
    raise AssertionError("unreachable")  # pragma: no cover


def store_prediction(
    acq: Acquisition,
    raster: Raster,
    output: TileOutput,
    latency: float,
    predictions: BlobStore | None,
    observer: PipelineObserver,
) -> TilePrediction:
    """Store the prediction COG (tagged with the model version) and make the tile's prediction record."""
    href = None
    if predictions is not None:
        with timed(observer, "store"):
            tags = {
                "acquisition_id": acq.id,
                "region": acq.region,
                "model_version": str(output.version),
                "acquisition_href": acq.href,  # a delayed label finds the image it labels (few-shot)
            }
            cog = write_cog(output.class_map, raster.crs, raster.transform, tags=tags)
            href = predictions.put(f"{acq.region}/{acq.id}.tif", cog, "image/tiff")
    f = output.features
    prediction = TilePrediction(
        acquisition_id=acq.id,
        region=acq.region,
        model_version=output.version,
        href=href,
        class_shares=tuple(map(float, f.class_shares)),
        mean_entropy=f.mean_entropy,
        latency_s=latency,
    )
    observer.predicted(prediction, f.mean_confidence)
    return prediction
