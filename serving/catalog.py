"""``terradapt catalog``: a static STAC catalog of one region's predictions, written beside them in object storage.

The stream stores, per prediction, ``<region>/<id>.tif`` (COG), ``<id>.tif.aux.xml``, ``<id>.json`` (its STAC item)
and ``<id>.acquisition.json`` (the acquisition's item). The catalog gathers them, with the MLM items of the model
versions that made them, into a self-contained catalog (relative links only) under ``catalog/<region>/``::

    catalog/<region>/catalog.json
    catalog/<region>/predictions/catalog.json   + predictions/<item id>/<item id>.json
    catalog/<region>/acquisitions/catalog.json  + acquisitions/<item id>/<item id>.json
    catalog/<region>/models/catalog.json        + models/<item id>/<item id>.json

Each prediction links (``derived_from``) to its acquisition item and model item inside the catalog, and its assets
(COG, legend sidecar) point back at the stored objects relatively, so the bucket or folder can be served as is to
a STAC browser or opened with QGIS' STAC plugin. Re-running replaces the catalog with the current predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pystac

from serving.registry import ModelRegistry
from serving.store import BlobStore
from terradapt.errors import ModelVersionNotFoundError
from terradapt.records import Acquisition, check_region

#: the pseudo-root the catalog is laid out under before its objects are written as keys of the store
_ROOT = "/"


@dataclass(frozen=True)
class CatalogSummary:
    """What one ``write_catalog`` wrote."""

    region: str
    href: str
    predictions: int
    acquisitions: int
    models: int
    keys: tuple[str, ...]


def _key(href: str) -> str:
    return href.removeprefix(_ROOT)


def _load(store: BlobStore, key: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(store.get(key))
    return document


def _model_items(registry: ModelRegistry, region: str, versions: set[int]) -> dict[int, pystac.Item]:
    """The MLM items of the versions that made predictions, with their ancestors (lineage links resolve)."""
    items: dict[int, pystac.Item] = {}
    todo = sorted(versions)
    while todo:
        version = todo.pop()
        if version in items:
            continue
        try:
            manifest = registry.manifest(region, version)
        except ModelVersionNotFoundError:
            continue  # deleted since (pruned): its predictions keep their property, without a link
        items[version] = pystac.Item.from_dict(registry.stac_item(manifest))
        if manifest.parent is not None:
            todo.append(manifest.parent)
    return items


def write_catalog(store: BlobStore, registry: ModelRegistry, region: str) -> CatalogSummary:
    """Write the static STAC catalog of ``region``'s predictions to ``store`` (see the module docstring).

    Args:
        store: The prediction store (bucket or folder) the stream writes predictions to.
        registry: The model registry, for the MLM items of the versions that made the predictions.
        region: The region code.

    Returns:
        What was written, with the catalog's URI.

    """
    check_region(region)
    names = store.list(f"{region}/")
    ids = sorted(k.removesuffix(".json").rsplit("/", 1)[1] for k in names if k.endswith(".json"))
    ids = [i for i in ids if not i.endswith(".acquisition")]
    root = pystac.Catalog(
        id=f"terradapt-{region}",
        description=f"Land-cover predictions of region {region} by terradapt, with their imagery and models.",
        title=f"terradapt {region}",
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
    )
    parts = {
        name: pystac.Catalog(id=name, description=f"{name} of region {region}", title=f"{region} {name}")
        for name in ("predictions", "acquisitions", "models")
    }
    for part in parts.values():
        root.add_child(part)
    predictions = [pystac.Item.from_dict(_load(store, f"{region}/{i}.json")) for i in ids]
    models = _model_items(registry, region, {int(p.properties["terradapt:model_version"]) for p in predictions})
    for _, model in sorted(models.items()):
        parts["models"].add_item(model)
        parent = model.properties.get("terradapt:parent")
        model.links = [link for link in model.links if link.rel != "predecessor-version"]
        if parent in models:
            model.add_link(pystac.Link("predecessor-version", models[parent], pystac.MediaType.GEOJSON))
    for name, prediction in zip(ids, predictions, strict=True):
        source_key = f"{region}/{name}.acquisition.json"
        acquisition: pystac.Item | None = None
        if store.exists(source_key):
            acquisition = Acquisition.from_stac(store.get(source_key)).to_stac()
            parts["acquisitions"].add_item(acquisition)
        prediction.links = [link for link in prediction.links if link.rel not in {"derived_from", "source"}]
        if acquisition is not None:
            prediction.add_link(pystac.Link("derived_from", acquisition, pystac.MediaType.GEOJSON))
            prediction.add_link(pystac.Link("source", acquisition, pystac.MediaType.GEOJSON))
        made_by = models.get(int(prediction.properties["terradapt:model_version"]))
        if made_by is not None:
            prediction.add_link(pystac.Link("derived_from", made_by, pystac.MediaType.GEOJSON))
        prediction.assets["landcover"].href = f"{_ROOT}{region}/{name}.tif"
        if "legend" in prediction.assets:
            prediction.assets["legend"].href = f"{_ROOT}{region}/{name}.tif.aux.xml"
        parts["predictions"].add_item(prediction)
    root.normalize_hrefs(f"{_ROOT}catalog/{region}")
    for item in parts["predictions"].get_items():
        for asset in item.assets.values():
            asset.href = pystac.utils.make_relative_href(asset.href, item.get_self_href() or "")
    keys = []
    for obj in [root, *root.get_children(), *[i for part in parts.values() for i in part.get_items()]]:
        key = _key(obj.get_self_href() or "")
        document = obj.to_dict(include_self_link=False, transform_hrefs=True)
        store.put(key, json.dumps(document, indent=1).encode(), "application/json")
        keys.append(key)
    for stale in sorted(set(store.list(f"catalog/{region}/")) - set(keys)):  # items of predictions gone since
        store.delete(stale)
    return CatalogSummary(
        region=region,
        href=store.uri(f"catalog/{region}/catalog.json"),
        predictions=len(predictions),
        acquisitions=len(list(parts["acquisitions"].get_items())),
        models=len(models),
        keys=tuple(keys),
    )
