"""The prediction stage's two steps: the predictor call (transient failures retried) and the stored prediction.

``Pipeline.process_many`` orders them; they are here so that the flow module stays the flow.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serving.predictor import Predictor, TileOutput
from serving.store import BlobStore
from stream.observer import PipelineObserver, timed
from stream.outcome import PredictorUnavailableError
from terradapt.legend import Legend
from terradapt.raster import Raster, write_cog
from terradapt.records import Acquisition, TilePrediction
from terradapt.stac_items import prediction_item


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
    classes: tuple[str, ...] = (),
    model_item: Callable[[str, int], str] | None = None,
) -> TilePrediction:
    """Store the prediction COG and its STAC items; make the tile's prediction record.

    Objects under ``<region>/`` in the prediction store: ``<id>.tif`` (the COG: class colour table, class names
    and model version in its tags), ``<id>.tif.aux.xml`` (GDAL category names), ``<id>.acquisition.json`` (the
    acquisition's STAC item) and ``<id>.json`` (the prediction's STAC item, linking both and the model's MLM item
    that ``model_item(region, version)`` names). Without ``classes`` (the model's class names) only the COG is
    written, tagged but without a legend.
    """
    f = output.features
    prediction = TilePrediction(
        acquisition_id=acq.id,
        region=acq.region,
        model_version=output.version,
        href=None,
        acquired=acq.acquired,
        class_shares=tuple(map(float, f.class_shares)),
        mean_entropy=f.mean_entropy,
        latency_s=latency,
    )
    if predictions is not None:
        with timed(observer, "store"):
            href = _store(acq, raster, output, prediction, predictions, classes, model_item)
        prediction = prediction.model_copy(update={"href": href})
    observer.predicted(prediction, f.mean_confidence)
    return prediction


@functools.cache
def _writer_pool() -> ThreadPoolExecutor:
    """The threads that write one tile's prediction objects concurrently (made on first use, shared)."""
    return ThreadPoolExecutor(max_workers=3, thread_name_prefix="terradapt-store")


def _store(
    acq: Acquisition,
    raster: Raster,
    output: TileOutput,
    prediction: TilePrediction,
    store: BlobStore,
    classes: tuple[str, ...],
    model_item: Callable[[str, int], str] | None,
) -> str:
    """Write the prediction's objects (see ``store_prediction``); return the COG's URI."""
    tags = {
        "acquisition_id": acq.id,
        "region": acq.region,
        "model_version": str(output.version),
        "acquisition_href": acq.href,  # a delayed label finds the image it labels (few-shot)
    }
    legend = Legend.for_classes(classes) if classes else None
    if legend is not None:
        tags.update(legend.tags())
    colormap = legend.colormap() if legend is not None else None
    cog = write_cog(output.class_map, raster.crs, raster.transform, tags=tags, colormap=colormap)
    base = f"{acq.region}/{acq.id}"
    # the COG and the two sidecars are written side by side (each call waits on the store, not the CPU); the item
    # that links them comes last, so a reader that finds the item finds what it names
    pool = _writer_pool()
    cog_put = pool.submit(store.put, f"{base}.tif", cog, "image/tiff; application=geotiff; profile=cloud-optimized")
    if legend is None:
        return cog_put.result()
    legend_put = pool.submit(store.put, f"{base}.tif.aux.xml", legend.aux_xml(), "application/xml")
    source_put = pool.submit(store.put, f"{base}.acquisition.json", acq.to_json(), "application/geo+json")
    href, legend_href, source = cog_put.result(), legend_put.result(), source_put.result()
    t = raster.transform
    item = prediction_item(
        acq,
        prediction.model_copy(update={"href": href}),
        legend,
        cog_href=href,
        shape=(raster.height, raster.width),
        transform=(t.a, t.b, t.c, t.d, t.e, t.f),
        cog_sha256=hashlib.sha256(cog).hexdigest(),
        cog_size=len(cog),
        legend_href=legend_href,
        acquisition_href=source,
        model_href=model_item(acq.region, output.version) if model_item is not None else None,
    )
    document = json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False)).encode()
    store.put(f"{base}.json", document, "application/geo+json")
    return href
