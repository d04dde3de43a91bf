"""Acquisition, prediction and model items are STAC 1.1 with the extensions they use; COGs carry their legend.

Validation is offline: stac-pydantic checks the core Item model, pystac reads every item back through its
extension classes, and explicit checks cover what schemas cannot (footprints in lon/lat ranges that match the
raster's bounds reprojected, the multihash checksum, the exact extension list).
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds
from rio_cogeo.cogeo import cog_validate
from stac_pydantic import Item as PydanticItem

from terradapt.checkpoint import ModelManifest
from terradapt.classes import FLAIR_CLASSES
from terradapt.legend import Legend
from terradapt.raster import Raster, raster_to_geotiff_bytes, write_cog
from terradapt.records import Acquisition, TilePrediction
from terradapt.stac import footprint, multihash_sha256, sha256_from_checksum
from terradapt.stac_items import model_item, prediction_item

PROJ = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
EO = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
FILE = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
SHA = "ab" * 32
TRANSFORM = (0.2, 0.0, 400_000.0, 0.0, -0.2, 6_400_102.4)
ACQ = Acquisition(
    id="D033-000001",
    region="D033",
    datetime=datetime(2021, 6, 14, 10, 22, tzinfo=UTC),
    bbox=(400_000.0, 6_400_000.0, 400_102.4, 6_400_102.4),
    href="s3://terradapt-acquisitions/D033/D033-000001.tif",
    sha256=SHA,
    shape=(512, 512),
    transform=TRANSFORM,
)


def _valid(document: dict[str, Any]) -> pystac.Item:
    """Core STAC 1.1 (stac-pydantic), lon/lat footprint inside its bbox, and readable by pystac."""
    PydanticItem.model_validate(document)
    assert document["stac_version"] == "1.1.0"
    if document["geometry"] is not None:
        ring = document["geometry"]["coordinates"][0]
        west, south, east, north = document["bbox"]
        assert ring[0] == ring[-1]
        for lon, lat in ring:
            assert -180 <= lon <= 180 and -90 <= lat <= 90
            assert west <= lon <= east and south <= lat <= north
    return pystac.Item.from_dict(document)


def test_acquisition_item_is_stac_1_1_with_exactly_the_extensions_it_uses():
    document = json.loads(ACQ.to_json())
    item = _valid(document)
    assert document["stac_extensions"] == [PROJ, EO, FILE]
    props = document["properties"]
    assert props["proj:code"] == "EPSG:2154" and props["proj:bbox"] == list(ACQ.bbox)
    assert props["proj:shape"] == [512, 512] and props["proj:transform"] == list(TRANSFORM)
    assert props["terradapt:region"] == "D033" and props["terradapt:schema_version"] == 2
    asset = document["assets"]["data"]
    assert asset["file:checksum"] == "1220" + SHA
    assert asset["eo:bands"][0] == {"name": "red", "common_name": "red"}
    assert asset["eo:bands"][4] == {"name": "elevation"}
    assert item.datetime == ACQ.datetime
    assert Acquisition.from_stac(document) == ACQ


def test_without_checksum_the_file_extension_is_not_listed():
    document = json.loads(ACQ.model_copy(update={"sha256": None}).to_json())
    assert document["stac_extensions"] == [PROJ, EO]


def test_footprint_is_the_raster_bounds_reprojected(tmp_path: Path):
    rio_stac = pytest.importorskip("rio_stac")
    raster = Raster(np.full((5, 512, 512), 90, np.uint8), "EPSG:2154", Affine(*TRANSFORM))
    path = tmp_path / "tile.tif"
    path.write_bytes(raster_to_geotiff_bytes(raster))
    with rasterio.open(path) as src:
        bounds = tuple(src.bounds)
        expected = transform_bounds(src.crs, "EPSG:4326", *bounds, densify_pts=21)
        reference = rio_stac.create_stac_item(src, input_datetime=ACQ.datetime, with_proj=True)
    geometry, bbox = footprint(bounds, "EPSG:2154")
    assert bbox is not None
    assert bbox == pytest.approx(expected, abs=1e-9)
    assert bbox == pytest.approx(reference.bbox, abs=1e-7)  # rio-stac's own densified footprint
    assert 44.0 < bbox[1] < bbox[3] < 45.0 and -1.0 < bbox[0] < bbox[2] < 0.0  # Gironde, where D033 is
    assert geometry is not None and len(geometry["coordinates"][0]) == 4 * 20 + 1


@pytest.mark.parametrize(
    ("bbox", "crs"),
    [((0.0, 0.0, 0.0, 0.0), "EPSG:2154"), ((1.0, 2.0, 3.0, 4.0), None), ((-400.0, 0.0, 400.0, 1.0), "EPSG:4326")],
    ids=["empty", "no-crs", "outside-lon-lat"],
)
def test_no_footprint_rather_than_a_wrong_one(bbox, crs):
    assert footprint(bbox, crs) == (None, None)
    document = json.loads(ACQ.model_copy(update={"bbox": bbox, "crs": crs}).to_json())
    assert document["geometry"] is None and "bbox" not in document
    _valid(document)


def test_checksum_is_a_sha2_256_multihash_and_bare_digests_still_read():
    assert multihash_sha256(SHA) == "1220" + SHA and len(multihash_sha256(SHA)) == 68
    assert sha256_from_checksum("1220" + SHA) == SHA
    assert sha256_from_checksum(SHA) == SHA


def test_schema_1_items_still_parse():
    # what schema version 1 wrote: bbox and geometry in EPSG:2154 metres, a bare sha256, no extensions listed
    x0, y0, x1, y1 = ACQ.bbox
    old = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": ACQ.id,
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "bbox": list(ACQ.bbox),
        "properties": {
            "terradapt:region": "D033",
            "terradapt:schema_version": 1,
            "proj:code": "EPSG:2154",
            "constellation": "aerial-vhr",
            "datetime": "2021-06-14T10:22:00Z",
        },
        "links": [],
        "assets": {"data": {"href": ACQ.href, "eo:bands": [{"name": "red"}], "file:checksum": SHA}},
    }
    back = Acquisition.from_stac(old)
    assert back.schema_version == 1 and back.bbox == ACQ.bbox and back.sha256 == SHA
    assert back.datetime == ACQ.datetime and back.crs == "EPSG:2154"


def test_unknown_capture_time_is_null_with_the_campaign_interval():
    start, end = datetime(2021, 4, 1, tzinfo=UTC), datetime(2021, 9, 30, tzinfo=UTC)
    acq = ACQ.model_copy(update={"datetime": None, "start_datetime": start, "end_datetime": end})
    document = json.loads(acq.to_json())
    props = document["properties"]
    assert props["datetime"] is None
    assert props["start_datetime"] == "2021-04-01T00:00:00Z" and props["end_datetime"] == "2021-09-30T00:00:00Z"
    _valid(document)
    back = Acquisition.from_stac(document)
    assert back == acq and back.acquired == start
    unknown = ACQ.model_copy(update={"datetime": None})
    assert json.loads(unknown.to_json())["properties"]["datetime"] is None
    assert Acquisition.from_stac(unknown.to_json()).acquired is None


def _gdal_category_names(path: Path) -> list[str]:
    """Band 1's category names as GDAL reads them (rasterio's bundled libgdal, through ctypes)."""
    libs = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*"))
    if not libs:
        pytest.skip("no bundled libgdal to ask (rasterio built against a system GDAL)")
    gdal = ctypes.CDLL(libs[0])
    gdal.GDALAllRegister()
    gdal.GDALOpen.restype = ctypes.c_void_p
    gdal.GDALOpen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    gdal.GDALGetRasterBand.restype = ctypes.c_void_p
    gdal.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    gdal.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    gdal.GDALClose.argtypes = [ctypes.c_void_p]
    gdal.GDALGetFileList.restype = ctypes.c_void_p
    gdal.GDALGetFileList.argtypes = [ctypes.c_void_p]
    gdal.CSLDestroy.argtypes = [ctypes.c_void_p]
    dataset = gdal.GDALOpen(str(path).encode(), 0)
    assert dataset
    try:
        # GTiff reads its PAM sidecar lazily, on the first georeferencing or file-list call (as gdalinfo makes)
        gdal.CSLDestroy(gdal.GDALGetFileList(dataset))
        names = gdal.GDALGetRasterCategoryNames(gdal.GDALGetRasterBand(dataset, 1))
        out: list[str] = []
        while names and names[len(out)] is not None:
            out.append(names[len(out)].decode())
        return out
    finally:
        gdal.GDALClose(dataset)


def test_prediction_cog_is_valid_with_its_colour_table_class_names_and_model_version(tmp_path: Path):
    legend = Legend.for_classes(FLAIR_CLASSES)
    class_map = np.random.default_rng(0).integers(0, 13, (600, 600)).astype(np.uint8)
    tags = {"model_version": "3", **legend.tags()}
    path = tmp_path / "D033-000001.tif"
    write_cog(class_map, "EPSG:2154", Affine(*TRANSFORM), path=path, tags=tags, colormap=legend.colormap())
    (tmp_path / "D033-000001.tif.aux.xml").write_bytes(legend.aux_xml())
    valid, errors, _ = cog_validate(str(path), quiet=True)
    assert valid, errors
    with rasterio.open(path) as src:
        colormap = src.colormap(1)
        assert colormap[0] == (0xDB, 0x0E, 0x9A, 255)  # building, FLAIR's magenta
        assert colormap[4] == (0x15, 0x53, 0xAE, 255)  # water
        assert colormap[255][3] == 0  # nodata transparent
        assert src.tags()["model_version"] == "3"
        assert json.loads(src.tags()["classes"]) == list(FLAIR_CLASSES)
    names = _gdal_category_names(path)
    assert names[:13] == list(FLAIR_CLASSES) and names[255] == "nodata"


def test_prediction_item_is_a_raster_label_item_linking_its_acquisition_and_model():
    prediction = TilePrediction(
        acquisition_id=ACQ.id, region="D033", model_version=2, class_shares=(0.5, 0.5), mean_entropy=0.1, latency_s=0.0
    )
    item = prediction_item(
        ACQ,
        prediction,
        Legend.for_classes(FLAIR_CLASSES),
        cog_href="s3://terradapt-predictions/D033/D033-000001.tif",
        shape=(512, 512),
        transform=TRANSFORM,
        cog_sha256=SHA,
        acquisition_href="s3://terradapt-predictions/D033/D033-000001.acquisition.json",
        model_href="s3://terradapt-models/models/D033/2/item.json",
    )
    document = item.to_dict(include_self_link=False)
    _valid(document)
    assert document["bbox"] == pytest.approx(json.loads(ACQ.to_json())["bbox"])
    props = document["properties"]
    assert props["label:type"] == "raster" and props["label:properties"] is None
    assert props["label:classes"] == [{"name": None, "classes": list(FLAIR_CLASSES)}]
    assert props["terradapt:model_version"] == 2 and props["proj:code"] == "EPSG:2154"
    asset = document["assets"]["landcover"]
    assert asset["file:checksum"] == "1220" + SHA and asset["raster:bands"][0]["nodata"] == 255
    assert asset["classification:classes"][0] == {
        "value": 0,
        "name": "building",
        "title": "building",
        "color_hint": "db0e9a",
    }
    used = {u.split("/")[3] for u in document["stac_extensions"]}
    assert used == {"projection", "label", "raster", "classification", "file"}
    derived = [link["href"] for link in document["links"] if link["rel"] == "derived_from"]
    assert derived == [
        "s3://terradapt-predictions/D033/D033-000001.acquisition.json",
        "s3://terradapt-models/models/D033/2/item.json",
    ]


def test_model_item_describes_the_version_with_the_mlm_extension():
    manifest = ModelManifest(
        config={"in_channels": 5, "num_classes": 13},
        classes=FLAIR_CLASSES,
        bands=("red", "green", "blue", "nir", "elevation"),
        input_mean=(100.0, 101.0, 102.0, 103.0, 104.0),
        input_std=(30.0, 31.0, 32.0, 33.0, 34.0),
        region="D033",
        version=2,
        parent=1,
        method="tent",
        training_regions=("D013", "D060"),
        gate_metrics={"entropy_drop": 0.12},
        sha256=SHA,
    )
    item = model_item(
        manifest,
        weights_href="s3://m/models/D033/2/weights.safetensors",
        manifest_href="s3://m/models/D033/2/manifest.json",
        parent_href="s3://m/models/D033/1/item.json",
    )
    document = item.to_dict(include_self_link=False)
    _valid(document)
    props = document["properties"]
    assert {u.split("/")[3] for u in document["stac_extensions"]} == {"mlm", "classification", "file"}
    assert props["mlm:architecture"] == "unet" and props["mlm:tasks"] == ["semantic-segmentation"]
    model_input = props["mlm:input"][0]
    assert model_input["bands"] == list(manifest.bands) and model_input["input"]["shape"] == [-1, 5, -1, -1]
    assert model_input["value_scaling"][0] == {"type": "z-score", "mean": 100.0, "stddev": 30.0}
    names = [c["title"] for c in props["mlm:output"][0]["classification:classes"]]
    assert names == list(FLAIR_CLASSES)
    assert props["terradapt:parent"] == 1 and props["terradapt:training_regions"] == ["D013", "D060"]
    assert props["terradapt:gate_metrics"] == {"entropy_drop": 0.12}
    assert document["assets"]["weights"]["roles"][0] == "mlm:model"
    assert document["assets"]["weights"]["file:checksum"] == "1220" + SHA
    assert [link["rel"] for link in document["links"]] == ["predecessor-version"]
