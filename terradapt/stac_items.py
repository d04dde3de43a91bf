"""STAC items of what terradapt produces: land-cover predictions (label extension) and model versions (MLM).

A prediction item describes one prediction COG: the footprint of the tile it labels (WGS84 geometry, native grid in
the projection extension), ``label:type`` raster with the class names, the classes with their colours
(classification extension) on the COG asset, and links to what it was made from: ``derived_from`` + ``source``
(label extension) to the acquisition item, ``derived_from`` to the model version's MLM item.

A model item describes one registry version with the Machine Learning Model extension: architecture, input bands
and their z-score normalisation, output classes, plus terradapt's lineage (parent version, method, training
regions, gate outcome and metrics) as ``terradapt:`` properties; its assets are the weights and the manifest.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pystac

from terradapt.checkpoint import ModelManifest
from terradapt.legend import Legend
from terradapt.records import SCHEMA_VERSION, Acquisition, TilePrediction
from terradapt.stac import footprint, is_authority_code, multihash_sha256

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
SAFETENSORS_MEDIA_TYPE = "application/octet-stream; application=safetensors"
_PREFIX = "terradapt:"


def prediction_item_id(acquisition_id: str) -> str:
    """The id of an acquisition's prediction item."""
    return f"{acquisition_id}-landcover"


def model_item_id(region: str, version: int) -> str:
    """The id of a model version's MLM item (``source`` for version 0, shared by every region)."""
    return f"terradapt-model-{'source' if version == 0 else region}-v{version}"


def _new_item(
    item_id: str,
    geometry: dict[str, Any] | None,
    bbox: Sequence[float] | None,
    when: datetime | None,
    start: datetime | None,
    end: datetime | None,
    properties: dict[str, Any],
) -> pystac.Item:
    """An item whose time is known, bounded (start/end) or unknown (``datetime: null``, no interval)."""
    bounded = when is None and start is not None and end is not None
    item = pystac.Item(
        id=item_id,
        geometry=geometry,
        bbox=list(bbox) if bbox else None,
        datetime=when if when is not None or bounded else datetime.now().astimezone(),
        start_datetime=start if bounded else None,
        end_datetime=end if bounded else None,
        properties=properties,
    )
    if when is None and not bounded:
        item.datetime = None
    return item


def _classes(legend: Legend) -> list[dict[str, Any]]:
    """The classification extension's classes (value, machine name, title, colour)."""
    return [
        {"value": i, "name": name.replace(" ", "_"), "title": name, "color_hint": color}
        for i, (name, color) in enumerate(zip(legend.names, legend.hex_colors(), strict=True))
    ] + [{"value": legend.nodata, "name": "nodata", "title": "no data", "nodata": True}]


def prediction_item(
    acq: Acquisition,
    prediction: TilePrediction,
    legend: Legend,
    *,
    cog_href: str,
    shape: tuple[int, int],
    transform: Sequence[float],
    cog_sha256: str | None = None,
    cog_size: int | None = None,
    legend_href: str | None = None,
    acquisition_href: str | None = None,
    model_href: str | None = None,
) -> pystac.Item:
    """The STAC item of one prediction COG (see the module docstring).

    Args:
        acq: The acquisition the prediction labels (footprint, capture time, CRS).
        prediction: The prediction record (model version, class shares, creation time).
        legend: Class names and colours of the class map.
        cog_href: Where the prediction COG is.
        shape: (rows, columns) of the class map.
        transform: Its affine transform (a, b, c, d, e, f) in the acquisition's CRS.
        cog_sha256: The COG's sha256, written as a multihash ``file:checksum``.
        cog_size: The COG's size in bytes.
        legend_href: The COG's GDAL sidecar with category names.
        acquisition_href: The acquisition's STAC item (``derived_from`` and ``source`` links).
        model_href: The model version's MLM item (``derived_from`` link).

    """
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.file import FileExtension

    with warnings.catch_warnings():  # pystac deprecates its helper (the extension is "pilot"), not the fields
        warnings.simplefilter("ignore", DeprecationWarning)
        from pystac.extensions.label import LabelClasses, LabelExtension, LabelType
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Sampling

    a, b, c, d, e, f = (float(v) for v in transform[:6])
    rows, cols = shape
    xs, ys = (c, c + a * cols + b * rows), (f, f + d * cols + e * rows)
    native = (min(xs), min(ys), max(xs), max(ys))
    geometry, lonlat = footprint(native, acq.crs)
    item = _new_item(
        prediction_item_id(acq.id),
        geometry,
        lonlat,
        acq.datetime,
        acq.start_datetime,
        acq.end_datetime,
        {
            f"{_PREFIX}region": acq.region,
            f"{_PREFIX}schema_version": SCHEMA_VERSION,
            f"{_PREFIX}acquisition_id": acq.id,
            f"{_PREFIX}model_version": prediction.model_version,
            f"{_PREFIX}class_shares": [round(float(s), 6) for s in prediction.class_shares],
            "created": pystac.utils.datetime_to_str(prediction.created),
        },
    )
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=acq.crs if acq.crs and is_authority_code(acq.crs) else None,
        wkt2=acq.crs if acq.crs and not is_authority_code(acq.crs) else None,
        bbox=list(native),
        shape=[rows, cols],
        transform=[a, b, c, d, e, f],
    )
    LabelExtension.ext(item, add_if_missing=True).apply(
        label_description=f"land cover of {acq.id} predicted by model {acq.region} v{prediction.model_version}",
        label_type=LabelType.RASTER,
        label_properties=None,
        label_classes=[LabelClasses.create(classes=list(legend.names), name=None)],
        label_tasks=["segmentation"],
        label_methods=["automated"],
    )
    asset = pystac.Asset(href=cog_href, media_type=COG_MEDIA_TYPE, roles=["data", "labels", "labels-raster"])
    item.add_asset("landcover", asset)
    RasterExtension.ext(asset, add_if_missing=True).apply(
        bands=[RasterBand.create(nodata=legend.nodata, data_type=DataType.UINT8, sampling=Sampling.AREA)]
    )
    ClassificationExtension.ext(asset, add_if_missing=True)
    asset.extra_fields["classification:classes"] = _classes(legend)
    if cog_sha256 is not None or cog_size is not None:
        FileExtension.ext(asset, add_if_missing=True).apply(
            checksum=multihash_sha256(cog_sha256) if cog_sha256 else None, size=cog_size
        )
    if legend_href is not None:
        item.add_asset(
            "legend",
            pystac.Asset(
                href=legend_href, media_type="application/xml", roles=["metadata"], title="GDAL category names"
            ),
        )
    if acquisition_href is not None:
        kind = pystac.MediaType.GEOJSON
        item.add_link(pystac.Link("derived_from", acquisition_href, kind, title=f"acquisition {acq.id}"))
        item.add_link(pystac.Link("source", acquisition_href, kind, title=f"imagery {acq.id}"))
    if model_href is not None:
        title = f"model {acq.region} v{prediction.model_version} (STAC MLM item)"
        item.add_link(pystac.Link("derived_from", model_href, pystac.MediaType.GEOJSON, title=title))
    return item


def model_item(
    manifest: ModelManifest,
    *,
    weights_href: str,
    manifest_href: str,
    parent_href: str | None = None,
) -> pystac.Item:
    """The STAC MLM item of one model version (see the module docstring).

    Args:
        manifest: The version's manifest (architecture, bands, classes, normalisation, lineage, gate).
        weights_href: Where ``weights.safetensors`` is.
        manifest_href: Where ``manifest.json`` is.
        parent_href: The parent version's MLM item (``predecessor-version`` link).

    """
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.file import FileExtension
    from pystac.extensions.mlm import MLMExtension

    legend = Legend.for_classes(manifest.classes)
    item = _new_item(
        model_item_id(manifest.region, manifest.version),
        None,
        None,
        manifest.created,
        None,
        None,
        {
            f"{_PREFIX}region": manifest.region,
            f"{_PREFIX}version": manifest.version,
            f"{_PREFIX}parent": manifest.parent,
            f"{_PREFIX}method": manifest.method,
            f"{_PREFIX}protocol": manifest.protocol,
            f"{_PREFIX}training_regions": list(manifest.training_regions),
            f"{_PREFIX}gate_accepted": manifest.gate_accepted,
            f"{_PREFIX}gate_reasons": list(manifest.gate_reasons),
            f"{_PREFIX}gate_metrics": dict(manifest.gate_metrics),
            f"{_PREFIX}metrics": dict(manifest.metrics),
            f"{_PREFIX}job_id": manifest.job_id,
        },
    )
    MLMExtension.ext(item, add_if_missing=True)
    ClassificationExtension.ext(item, add_if_missing=True)  # the output's classification:classes
    scaling = None
    if manifest.input_mean and manifest.input_std:
        scaling = [
            {"type": "z-score", "mean": m, "stddev": s}
            for m, s in zip(manifest.input_mean, manifest.input_std, strict=True)
        ]
    count = len(manifest.bands)
    item.properties.update(
        {
            "mlm:name": f"terradapt {manifest.region} v{manifest.version}",
            "mlm:architecture": manifest.architecture,
            "mlm:tasks": ["semantic-segmentation"],
            "mlm:framework": "pytorch",
            "mlm:pretrained": manifest.version > 0,
            "mlm:input": [
                {
                    "name": "tiles",
                    "bands": list(manifest.bands),
                    "input": {
                        "shape": [-1, count, -1, -1],
                        "dim_order": ["batch", "bands", "height", "width"],
                        "data_type": "uint8",
                    },
                    "value_scaling": scaling,
                }
            ],
            "mlm:output": [
                {
                    "name": "classes",
                    "tasks": ["semantic-segmentation"],
                    "result": {
                        "shape": [-1, len(manifest.classes), -1, -1],
                        "dim_order": ["batch", "channel", "height", "width"],
                        "data_type": "float32",
                    },
                    "classification:classes": _classes(legend)[:-1],
                }
            ],
        }
    )
    weights = pystac.Asset(
        href=weights_href,
        media_type=SAFETENSORS_MEDIA_TYPE,
        roles=["mlm:model", "mlm:weights", "data"],
        title="weights (safetensors state dict)",
        extra_fields={"mlm:artifact_type": "safetensors"},
    )
    item.add_asset("weights", weights)
    if manifest.sha256:
        FileExtension.ext(weights, add_if_missing=True).apply(checksum=multihash_sha256(manifest.sha256))
    item.add_asset("manifest", pystac.Asset(href=manifest_href, media_type=pystac.MediaType.JSON, roles=["metadata"]))
    if parent_href is not None:
        title = f"parent version v{manifest.parent}"
        item.add_link(pystac.Link("predecessor-version", parent_href, pystac.MediaType.GEOJSON, title=title))
    return item
