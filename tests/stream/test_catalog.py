"""Predictions of the stream become a static STAC catalog that pystac opens back with every link resolved."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pystac
from rio_cogeo.cogeo import cog_validate
from stac_pydantic import Item as PydanticItem

from serving.catalog import write_catalog
from serving.store import FileSystemStore
from tests.fakes.world import make_rig, publish, settings


def test_catalog_of_a_regions_predictions_opens_with_every_link_resolved(world, tmp_path: Path):
    rig = make_rig(world, tmp_path / "models", settings())
    store = FileSystemStore(tmp_path / "predictions")
    rig.pipeline.predictions = store
    for index in range(3):
        out = rig.pipeline.process(publish(rig.objects, "D033", index, world.source[index].image), "D033", None)
        assert [m.topic for m in out.messages] == ["predictions", "features"]
    stored = json.loads(store.get("D033/D033-00000.json"))
    PydanticItem.model_validate(stored)
    assert stored["links"][-1]["href"] == rig.registry.stac_item_uri("D033", 0)
    cog = tmp_path / "predictions" / "D033" / "D033-00000.tif"
    assert cog_validate(str(cog), quiet=True)[0]

    summary = write_catalog(store, rig.registry, "D033")
    assert (summary.predictions, summary.acquisitions, summary.models) == (3, 3, 1)
    root = pystac.Catalog.from_file(str(tmp_path / "predictions" / "catalog" / "D033" / "catalog.json"))
    assert {c.id for c in root.get_children()} == {"predictions", "acquisitions", "models"}
    items = list(root.get_items(recursive=True))
    assert len(items) == 7
    for item in items:
        document = item.to_dict(include_self_link=False)
        PydanticItem.model_validate(document)
        assert document["stac_version"] == "1.1.0"
        for link in item.links:
            if link.rel == "self":
                continue
            target = Path(urlparse(link.get_absolute_href() or "").path)
            assert target.is_file(), f"{item.id}: {link.rel} -> {link.href}"
        on_disk = json.loads(Path(item.get_self_href() or "").read_text())
        assert all(not link["href"].startswith(("/", "file:")) for link in on_disk["links"])  # self-contained
    predictions = list(root.get_child("predictions").get_items())  # type: ignore[union-attr]
    for prediction in predictions:
        for asset in prediction.assets.values():
            assert Path(asset.get_absolute_href() or "").is_file()
        derived = {link.resolve_stac_object().target.id for link in prediction.links if link.rel == "derived_from"}
        acquisition_id = prediction.properties["terradapt:acquisition_id"]
        assert derived == {acquisition_id, "terradapt-model-source-v0"}

    summary = write_catalog(store, rig.registry, "D033")  # idempotent: same objects, none left over
    assert len(summary.keys) == len(set(store.list("catalog/D033/")))
