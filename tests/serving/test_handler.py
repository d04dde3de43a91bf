"""The TorchServe handler with a mock context and a tiny model (no TorchServe process), plus the wire format and
the .mar packaging it is shipped in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from affine import Affine
from ts.context import Context, RequestProcessor

from monitoring.features import TileFeatures
from serving.codec import (
    HandlerConfig,
    decode_class_map,
    decode_prediction,
    encode_class_map,
    error_body,
    error_status,
    features_from_json,
    features_to_json,
)
from serving.handler import TerradaptHandler
from serving.packaging import (
    MODEL_CONFIG_FILE,
    archive_path,
    archive_url,
    archived_manifest,
    model_name,
    package_version,
)
from serving.predictor import predict_images
from serving.registry import ModelRegistry
from serving.store import FileSystemStore
from terradapt.checkpoint import ModelManifest, encode, save_checkpoint
from terradapt.errors import (
    ChecksumMismatchError,
    CorruptTileError,
    InvalidPayloadError,
    InvalidTileError,
    ObjectNotFoundError,
    OversizedTileError,
)
from terradapt.model import UNet, UNetConfig
from terradapt.raster import Raster, raster_to_geotiff_bytes
from tests.fakes.archs import ARCH_IDS, toy_model

CFG = UNetConfig(in_channels=5, num_classes=4, base_channels=4, depth=2)
ROOT = Path(__file__).resolve().parents[2]


def _manifest(**kw):
    return ModelManifest(config=CFG.to_dict(), classes=("a", "b", "c", "d"), bands=("r", "g", "b", "n", "e"), **kw)


def _tiff(image, crs="EPSG:2154"):
    return raster_to_geotiff_bytes(Raster(image, crs, Affine(0.2, 0.0, 417_000.0, 0.0, -0.2, 6_425_000.0)))


def _image(seed=0, bands=5, size=64):
    return np.random.default_rng(seed).integers(0, 255, size=(bands, size, size), dtype=np.uint8)


class _Metrics:
    def add_time(self, *args, **kwargs):
        pass


def _context(model_dir: Path, handler_settings: dict[str, Any] | None = None) -> Context:
    manifest = {"model": {"modelName": "landcover-D033", "modelVersion": "2", "handler": "handler.py"}}
    ctx = Context(
        "landcover-D033",
        str(model_dir),
        manifest,
        1,
        None,
        "0.12.0",
        metrics=_Metrics(),
        model_yaml_config={"handler": handler_settings or {}},
    )
    return ctx


def _call(handler: TerradaptHandler, ctx: Context, bodies: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """What TorchServe's service does around handle(): one RequestProcessor per request of the batch."""
    ctx.request_processor = [RequestProcessor({}) for _ in bodies]
    answers = handler.handle([{"body": b} for b in bodies], ctx)
    return [(ctx.get_response_status(i)[0], json.loads(a)) for i, a in enumerate(answers)]


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "model", UNet(CFG), _manifest(region="D033", version=2, parent=1, method="bn"))
    return tmp_path / "model"


@pytest.fixture
def handler(model_dir):
    h = TerradaptHandler()
    h.initialize(_context(model_dir, {"window": 64, "overlap": 16, "max_request_bytes": 200_000}))
    return h


def test_predicts_like_the_in_process_predictor(handler, model_dir):
    images = [_image(0), _image(1)]
    answers = _call(handler, _context(model_dir), [_tiff(im) for im in images])
    expected = predict_images(handler.model, images, 2, torch.device("cpu"), 64, 16, 4)
    for (status, body), want in zip(answers, expected, strict=True):
        assert status == 200
        assert (body["model"], body["version"], body["region"]) == ("landcover-D033", 2, "D033")
        assert body["crs"] == "EPSG:2154" and body["transform"][2] == 417_000.0
        got = decode_prediction(body)
        np.testing.assert_array_equal(got.class_map, want.class_map)
        np.testing.assert_allclose(got.features.deep, want.features.deep, rtol=1e-6)
        assert got.features.mean_entropy == pytest.approx(want.features.mean_entropy, rel=1e-6)


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_every_architecture_is_served_like_the_in_process_predictor(tmp_path, arch):
    model = toy_model(arch, seed=2)
    directory = tmp_path / arch
    save_checkpoint(directory, model, _manifest(region="D033", version=2, parent=1, method="bn"))
    h = TerradaptHandler()
    h.initialize(_context(directory, {"window": 64, "overlap": 16}))
    image = _image(5, size=96)  # two overlapping windows per axis
    ((status, body),) = _call(h, _context(directory), [_tiff(image)])
    assert status == 200
    got = decode_prediction(body)
    want = predict_images(model, [image], 2, torch.device("cpu"), 64, 16, 4)[0]
    np.testing.assert_array_equal(got.class_map, want.class_map)
    assert got.features.deep.shape == (model.feature_dim,)
    np.testing.assert_allclose(got.features.deep, want.features.deep, rtol=1e-5, atol=1e-6)
    assert got.features.bn_mean_shift > 0  # every contract architecture has BatchNorm layers


def test_large_raster_is_tiled_and_keeps_its_shape(handler, model_dir):
    image = _image(3, size=150)  # window 64: 3 x 3 overlapping windows, blended
    ((status, body),) = _call(handler, _context(model_dir), [_tiff(image, crs=None)])
    assert status == 200
    assert decode_prediction(body).class_map.shape == (150, 150)
    expected = predict_images(handler.model, [image], 2, torch.device("cpu"), 64, 16, 4)[0]
    np.testing.assert_array_equal(decode_class_map(body["class_map"]), expected.class_map)


def test_bad_requests_get_4xx_json_and_do_not_sink_the_batch(handler, model_dir):
    bodies = [
        _tiff(_image(0)),
        _tiff(_image(0, bands=3)),
        b"definitely not a tiff",
        _tiff(np.random.default_rng(0).integers(0, 255, (5, 256, 256), dtype=np.uint8)),  # > 200 kB limit
        json.dumps({"url": "s3://bucket/key"}).encode(),
        {"uri": "http://example.org/x.tif"},
        _tiff(_image(0, size=16)),
    ]
    answers = _call(handler, _context(model_dir), bodies)
    statuses = [s for s, _ in answers]
    reasons = [b.get("error", {}).get("reason") for _, b in answers]
    assert statuses == [200, 422, 422, 413, 400, 400, 422]
    assert reasons == [
        None,
        "invalid_tile",
        "corrupt_tile",
        "oversized_tile",
        "malformed_payload",
        "malformed_payload",
        "invalid_tile",
    ]
    assert "band_count=3" in answers[1][1]["error"]["message"]
    assert "5 bands" in answers[1][1]["error"]["message"]


def test_tampered_weights_are_refused_at_load(model_dir):
    weights = model_dir / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch"):
        TerradaptHandler().initialize(_context(model_dir))


class _FakeObject:
    def __init__(self, data):
        self.data = data

    def stream(self, amt):
        for i in range(0, len(self.data), amt):
            yield self.data[i : i + amt]

    def close(self):
        pass

    def release_conn(self):
        pass


class _FakeMinio:
    def __init__(self, objects):
        self.objects = objects
        self.downloads = 0

    def _missing(self, key):
        from minio.error import S3Error

        # no HTTP response behind this fake error: S3Error only stores it
        return S3Error(cast(Any, None), "NoSuchKey", "missing", key, "req", "host")

    def stat_object(self, bucket, key):
        if (bucket, key) not in self.objects:
            raise self._missing(key)
        return type("Stat", (), {"size": len(self.objects[bucket, key])})()

    def get_object(self, bucket, key):
        self.downloads += 1
        return _FakeObject(self.objects[bucket, key])


def test_object_uri_requests(handler, model_dir, monkeypatch):
    big = _tiff(np.random.default_rng(0).integers(0, 255, (5, 300, 300), dtype=np.uint8))
    fake = _FakeMinio({("acq", "D033/a.tif"): _tiff(_image(0)), ("acq", "D033/big.tif"): big})
    handler._storage = fake
    handler.config = handler.config.model_copy(update={"max_object_bytes": len(big) - 1})
    answers = _call(
        handler,
        _context(model_dir),
        [{"uri": "s3://acq/D033/a.tif"}, {"uri": "s3://acq/D033/none.tif"}, {"uri": "s3://acq/D033/big.tif"}],
    )
    assert [s for s, _ in answers] == [200, 404, 413]
    assert fake.downloads == 1  # the oversized object is refused from its size, never downloaded


def test_object_uri_without_storage_settings_is_a_503(handler, model_dir, monkeypatch):
    for key in list(os.environ):
        if key.startswith("TERRADAPT_S3"):
            monkeypatch.delenv(key)
    ((status, body),) = _call(handler, _context(model_dir), [{"uri": "s3://acq/D033/a.tif"}])
    assert status == 503 and body["error"]["reason"] == "storage_unavailable"
    assert "TERRADAPT_S3__ENDPOINT" in body["error"]["message"]


def test_describe_shows_lineage_and_settings(handler):
    described = handler.describe_handle()
    assert described["manifest"]["version"] == 2 and described["manifest"]["method"] == "bn"
    assert described["handler"]["window"] == 64


# -- wire format ------------------------------------------------------------------------------------------------
def test_class_map_and_features_round_trip():
    class_map = np.random.default_rng(0).integers(0, 13, (37, 53), dtype=np.uint8)
    encoded = encode_class_map(class_map)
    assert len(encoded["data"]) < class_map.size  # compressed
    np.testing.assert_array_equal(decode_class_map(encoded), class_map)
    rng = np.random.default_rng(1)
    features = TileFeatures(
        band_mean=rng.random(5),
        band_std=rng.random(5),
        residual_mean=rng.random(5),
        residual_std=rng.random(5),
        deep=rng.random(16),
        bn_mean_shift=0.25,
        bn_var_ratio=1 / 3,
        class_shares=rng.random(4),
        mean_entropy=0.7,
        mean_confidence=0.6,
    )
    back = features_from_json(json.loads(json.dumps(features_to_json(features))))
    for name in ("band_mean", "deep", "class_shares"):
        np.testing.assert_array_equal(getattr(back, name), getattr(features, name))  # exact: JSON floats round-trip
    assert back.bn_var_ratio == features.bn_var_ratio


def test_wire_format_rejects_malformed_answers():
    with pytest.raises(InvalidPayloadError, match="shape"):
        decode_class_map({**encode_class_map(np.zeros((4, 4), np.uint8)), "shape": [5, 5]})
    with pytest.raises(InvalidPayloadError, match="missing"):
        features_from_json({"band_mean": [0.1]})
    with pytest.raises(InvalidPayloadError):
        decode_prediction({"version": 1})


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (OversizedTileError("bytes", 10, "at most 1"), 413),
        (CorruptTileError("truncated"), 422),
        (InvalidTileError("dtype", "float32", "uint8"), 422),
        (InvalidPayloadError("bad"), 400),
        (ObjectNotFoundError("s3://a/b"), 404),
        (RuntimeError("boom"), 500),
    ],
)
def test_error_mapping(error, status):
    assert error_status(error) == status
    body = error_body(error)["error"]
    assert body["status"] == status
    if status == 500:
        assert body["reason"] == "internal_error" and "boom" not in body["message"]  # no internals leak out


# -- packaging --------------------------------------------------------------------------------------------------
@pytest.fixture
def registry(tmp_path):
    reg = ModelRegistry(FileSystemStore(tmp_path / "registry"))
    torch.manual_seed(0)
    weights, manifest = encode(UNet(CFG), _manifest())
    reg.publish_source(weights, ModelManifest.model_validate_json(manifest))
    weights, manifest = encode(UNet(CFG), _manifest(region="D033", parent=0, method="bn"))
    reg.publish(weights, ModelManifest.model_validate_json(manifest))
    return reg


def test_model_names_are_per_region():
    assert model_name("D033") == "landcover-D033"
    assert model_name("source") == "landcover-source"
    assert archive_url("D033", 3) == "landcover-D033-v3.mar"
    with pytest.raises(ValueError, match="region code"):
        model_name("../etc")


def test_package_version_builds_a_self_describing_archive(registry, tmp_path):
    store = tmp_path / "store"
    path = package_version(registry, "D033", 1, store, config=HandlerConfig(window=128))
    assert path == archive_path(store, "D033", 1) and path.is_file()
    assert sorted(p.name for p in store.iterdir()) == ["landcover-D033-v1.mar"]  # no build leftovers
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        mar = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        config = zf.read(MODEL_CONFIG_FILE).decode()
    assert {
        "weights.safetensors",
        "manifest.json",
        "handler.py",
        "terradapt/checkpoint.py",
        "serving/predictor.py",
        "monitoring/features.py",
    } <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert (mar["model"]["modelName"], mar["model"]["modelVersion"]) == ("landcover-D033", "1")
    assert "window: 128" in config and "minWorkers: 1" in config
    assert archived_manifest(path).sha256 == registry.manifest("D033", 1).sha256
    # idempotent: same weights, archive kept; force rebuilds
    mtime = path.stat().st_mtime_ns
    assert package_version(registry, "D033", 1, store).stat().st_mtime_ns == mtime
    package_version(registry, "D033", 1, store, force=True)
    assert path.stat().st_mtime_ns != mtime
    # the source model packages under the region's name as version 0
    assert archived_manifest(package_version(registry, "D033", 0, store)).region == "source"


def test_archive_runs_its_own_code_not_the_checkout(registry, tmp_path):
    """What a TorchServe worker does: the unpacked archive first on sys.path, the project not importable."""
    path = package_version(registry, "D033", 1, tmp_path / "store")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(path) as zf:
        zf.extractall(unpacked)
    script = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
sys.path.insert(0, {str(unpacked)!r})
import handler, terradapt, serving.predictor
assert terradapt.__file__.startswith({str(unpacked)!r}), terradapt.__file__
print("ok", handler.TerradaptHandler.__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=unpacked, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok TerradaptHandler" in done.stdout
