"""TorchServe client, predictor and deployer.

The first part needs no server (httpx.MockTransport: retries, backoff, token refresh, error mapping; the shadow
comparison). The part marked ``services`` runs against a real TorchServe started by
``deploy/torchserve/torchserve.sh`` on free loopback ports in a temporary run directory, with tiny models
(UNet base_channels=4, depth=2) on 64 x 64 tiles.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from adapters.buffer import BufferedTile
from adapters.gate import GateConfig, GateContext
from adapters.registry import create_adapter
from monitoring.features import TileFeatures
from serving.packaging import archive_path, model_name
from serving.predictor import InProcessPredictor, TileOutput
from serving.registry import ModelRegistry
from serving.rollout import RolloutContext
from serving.store import FileSystemStore
from serving.torchserve import (
    PredictionRejectedError,
    RolloutConfig,
    TorchServeAuthError,
    TorchServeClient,
    TorchServeDeployer,
    TorchServePredictor,
    TorchServeUnavailableError,
    compare_outputs,
    encode_tile,
)
from terradapt.checkpoint import ModelManifest, encode
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.errors import ModelVersionNotFoundError, TerradaptError
from terradapt.model import SegmentationModel, UNet, UNetConfig
from terradapt.records import RolloutStep
from terradapt.settings import TorchServeConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "torchserve" / "torchserve.sh"
CFG = UNetConfig(in_channels=5, num_classes=4, base_channels=4, depth=2)


# ================================================================================================ no server needed
def _keys(path: Path, inference: str = "inf-1", api: str = "api-1") -> Path:
    path.write_text(json.dumps({"management": {"key": "man-1"}, "inference": {"key": inference}, "API": {"key": api}}))
    return path


def _client(handler, tmp_path, *, retries=3, key_file=True):
    sleeps: list[float] = []
    config = TorchServeConfig(
        inference_url="http://ts.test:1",
        management_url="http://ts.test:2",
        metrics_url="http://ts.test:3",
        key_file=_keys(tmp_path / "key_file.json") if key_file else None,
        retries=retries,
        timeout_s=5,
    )
    client = TorchServeClient(config, transport=httpx.MockTransport(handler), sleep=sleeps.append)
    return client, sleeps


def test_connection_failures_are_retried_with_backoff_then_raised(tmp_path):
    calls = []

    def refuse(request):
        calls.append(request.url.path)
        raise httpx.ConnectError("connection refused", request=request)

    client, sleeps = _client(refuse, tmp_path, retries=3)
    with pytest.raises(TorchServeUnavailableError) as caught:
        client.predict("landcover-D033", b"tiff")
    assert len(calls) == 4 and sleeps == [0.2, 0.4, 0.8]  # 1 try + 3 retries, exponential
    assert isinstance(caught.value, ConnectionError) and caught.value.reason == "torchserve_unavailable"


def test_a_server_coming_back_within_the_retries_is_used(tmp_path):
    attempts = iter([httpx.ConnectError, httpx.RemoteProtocolError, None, None])

    def flaky(request):
        error = next(attempts)
        if error is not None:
            raise error("down", request=request)
        return httpx.Response(503, json={"code": 503}) if request.url.path == "/busy" else httpx.Response(200, json={})

    client, sleeps = _client(flaky, tmp_path)
    assert client.predict("landcover-D033", b"tiff") == {}
    assert sleeps == [0.2, 0.4]


def test_503_is_retried_and_handler_errors_are_typed(tmp_path):
    answers = iter(
        [
            httpx.Response(503, json={"code": 503, "type": "ServiceUnavailableException", "message": "no worker"}),
            httpx.Response(422, json={"error": {"reason": "invalid_tile", "message": "band_count=3", "status": 422}}),
            httpx.Response(404, json={"code": 404, "type": "ModelVersionNotFoundException", "message": "v7"}),
        ]
    )
    client, sleeps = _client(lambda request: next(answers), tmp_path)
    with pytest.raises(PredictionRejectedError) as caught:
        client.predict("landcover-D033", b"tiff", version=2)
    assert (caught.value.reason, caught.value.status, sleeps) == ("invalid_tile", 422, [0.2])
    with pytest.raises(ModelVersionNotFoundError, match="'7'"):
        client.predict("landcover-D033", b"tiff", version=7)


def test_refused_token_is_reread_then_regenerated(tmp_path):
    key_file = tmp_path / "key_file.json"
    seen = []

    def server(request):
        token = request.headers.get("Authorization", "")
        seen.append((request.url.path, token))
        if request.url.path == "/token":  # TorchServe rewrites its key file when a key is regenerated
            assert token == "Bearer api-1"
            _keys(key_file, inference="inf-3")
            return httpx.Response(200)
        valid = json.loads(key_file.read_text())["inference"]["key"]
        if token != f"Bearer {valid}":
            return httpx.Response(400, json={"code": 400, "type": "InvalidKeyException", "message": "expired"})
        return httpx.Response(200, json={"status": "Healthy"})

    client, _ = _client(server, tmp_path)
    assert client.ping()
    _keys(key_file, inference="inf-2")  # rotated by someone else: re-reading the file is enough
    assert client.ping()
    server_side = "inf-4"

    def expire(request):  # the key in the file itself expired: regenerate it with the API key
        nonlocal server_side
        if request.url.path == "/token":
            _keys(key_file, inference=server_side)
            return httpx.Response(200)
        ok = request.headers.get("Authorization") == f"Bearer {server_side}"
        return httpx.Response(200 if ok else 400, json={"type": "InvalidKeyException"} if not ok else {})

    client2, _ = _client(expire, tmp_path)
    client2.predict("m", b"x")
    assert json.loads(key_file.read_text())["inference"]["key"] == "inf-4"


def test_without_a_token_the_client_says_so(tmp_path):
    client, _ = _client(lambda r: httpx.Response(400, json={"type": "InvalidKeyException"}), tmp_path, key_file=False)
    with pytest.raises(TorchServeAuthError, match="key_file"):
        client.models()


def _output(class_map, entropy):
    k = 4
    feats = TileFeatures(
        band_mean=np.zeros(5),
        band_std=np.zeros(5),
        residual_mean=np.zeros(5),
        residual_std=np.zeros(5),
        deep=np.zeros(8),
        bn_mean_shift=0.0,
        bn_var_ratio=0.0,
        class_shares=np.bincount(class_map.ravel(), minlength=k) / class_map.size,
        mean_entropy=entropy,
        mean_confidence=0.5,
    )
    return TileOutput(class_map.astype(np.uint8), feats, 1)


def test_shadow_comparison_applies_the_gate_thresholds():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 4, (32, 32)) for _ in range(3)]
    current = [_output(m, 1.0) for m in maps]
    same = compare_outputs([_output(m, 0.95) for m in maps], current, 4, GateConfig())
    assert same.accepted and same.metrics["agreement"] == 1.0
    collapsed = compare_outputs([_output(np.zeros_like(m), 0.01) for m in maps], current, 4, GateConfig())
    assert not collapsed.accepted
    text = " ".join(collapsed.reasons)
    assert "entropy collapse" in text and "class collapse" in text and "low agreement" in text
    # labelled tiles: a candidate that loses mIoU is refused even when label-free checks pass
    masks = [m.astype(np.uint8) for m in maps]
    worse = [np.where(rng.random(m.shape) < 0.2, (m + 1) % 4, m) for m in maps]
    labelled = compare_outputs([_output(w, 1.0) for w in worse], current, 4, GateConfig(), masks=masks)
    assert not labelled.accepted and "mIoU" in labelled.reasons[0]


# ================================================================================================ real TorchServe
def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class Server:
    env: dict[str, str]
    run_dir: Path
    model_store: Path
    config: TorchServeConfig

    def script(self, command: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", str(SCRIPT), command], env=self.env, capture_output=True, text=True, timeout=240, check=False
        )
        if done.returncode != 0 and command != "status":
            log = self.run_dir / "logs" / "torchserve.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"torchserve.sh {command} failed:\n{done.stderr}\n{tail}")
        return done

    def client(self, **kw) -> TorchServeClient:
        return TorchServeClient(self.config.model_copy(update=kw.pop("config", {})), **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchserve-run")
    inference, management, metrics = _free_ports(3)
    env = {
        **os.environ,
        "TERRADAPT_RUN_DIR": str(run_dir),
        "TERRADAPT_TS_INFERENCE_PORT": str(inference),
        "TERRADAPT_TS_MANAGEMENT_PORT": str(management),
        "TERRADAPT_TS_METRICS_PORT": str(metrics),
    }
    config = TorchServeConfig(
        inference_url=f"http://127.0.0.1:{inference}",
        management_url=f"http://127.0.0.1:{management}",
        metrics_url=f"http://127.0.0.1:{metrics}",
        key_file=run_dir / "torchserve" / "key_file.json",
        timeout_s=60,
        retries=3,
    )
    srv = Server(env, run_dir, run_dir / "torchserve" / "model-store", config)
    srv.script("start")
    try:
        yield srv
    finally:
        srv.script("stop")


def _bn(model: SegmentationModel, images: np.ndarray, prior: float) -> SegmentationModel:
    return create_adapter("bn", model, {"prior_tiles": prior}).adapt([torch.from_numpy(images).float()])


@dataclass
class World:
    registry: ModelRegistry
    tiles: dict[str, list[BufferedTile]]
    source: SegmentationModel

    def context(self, region: str, label_shift: tuple[float, ...] | None = None) -> RolloutContext:
        """What the pipeline hands a deployer for a job of ``region``: its tiles and the gate context."""
        return RolloutContext(tuple(self.tiles[region]), GateContext(label_shift=label_shift))

    def images(self, region: str) -> np.ndarray:
        return np.stack([t.image for t in self.tiles[region]])

    def publish(self, region: str, model: SegmentationModel, parent: int, method: str = "bn") -> int:
        manifest = ModelManifest(
            config={},  # encode() writes the model's own architecture and config
            classes=("a", "b", "c", "d"),
            bands=("r", "g", "b", "n", "e"),
            region=region,
            parent=parent,
            method=method,
        )
        weights, manifest_json = encode(model, manifest)
        return self.registry.publish(weights, ModelManifest.model_validate_json(manifest_json)).version

    def adapted(self, region: str, base: int, prior: float) -> int:
        model, _ = self.registry.load(region, base)
        return self.publish(region, _bn(model, self.images(region), prior), base)

    def broken(self, region: str, base: int) -> int:
        """Weights that collapse to one class: class 0's head bias made huge."""
        model, _ = self.registry.load(region, base)
        bias = model.classifier().bias
        assert bias is not None
        with torch.no_grad():
            bias[0] += 1e4
        return self.publish(region, model, base, method="broken")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = SyntheticDataset({r: 8 for r in ("D033", "D013", "D040", "D067", "D029", "D074")}, size=64, seed=0)
    tiles = {r: [BufferedTile(f"{r}-{t}", data.load(r, t).image) for t in data.tile_ids(r)] for r in data.regions()}
    torch.manual_seed(1)  # a seed whose tiny source model spreads its predictions over the classes
    source = _bn(UNet(CFG), np.stack([t.image for t in tiles["D033"]]), prior=0.0).eval()
    registry = ModelRegistry(FileSystemStore(tmp_path_factory.mktemp("registry")))
    weights, manifest = encode(
        source, ModelManifest(config=CFG.to_dict(), classes=("a", "b", "c", "d"), bands=("r", "g", "b", "n", "e"))
    )
    registry.publish_source(weights, ModelManifest.model_validate_json(manifest))
    return World(registry, tiles, source)


def _deployer(server, world, **kw) -> TorchServeDeployer:
    return TorchServeDeployer(server.client(), world.registry, server.model_store, **kw)


def _drop(client: TorchServeClient, region: str) -> None:
    """Unregister every version of a region's model (non-default ones first: TorchServe refuses the default)."""
    name = model_name(region)
    default = client.default_version(name)
    for v in sorted(client.versions(name), key=lambda v: v == default):
        client.unregister(name, v)


@pytest.mark.services
def test_v1_is_registered_and_predicts_like_in_process(server, world):
    deployer = _deployer(server, world)
    v1 = world.adapted("D013", 0, prior=4.0)
    event = deployer.rollout("D013", v1, world.context("D013"))
    assert event.step is RolloutStep.PROMOTED and (event.version, event.previous) == (v1, 0)
    steps = [e.step for e in deployer.events]
    assert steps == [RolloutStep.REGISTERED, RolloutStep.SHADOW_PASSED, RolloutStep.PROMOTED]
    client = deployer.client
    assert client.versions("landcover-D013") == [0, v1] and client.default_version("landcover-D013") == v1
    images = list(world.images("D013")[:3])
    served = TorchServePredictor(client).predict("D013", images)
    local = InProcessPredictor(world.registry, device="cpu").predict("D013", images)
    for s, loc in zip(served, local, strict=True):
        assert s.version == loc.version == v1
        np.testing.assert_array_equal(s.class_map, loc.class_map)
        np.testing.assert_allclose(s.features.class_shares, loc.features.class_shares)
        np.testing.assert_allclose(s.features.deep, loc.features.deep, rtol=1e-4, atol=1e-6)
    metrics = client.metrics()
    assert 'model_name="landcover-D013"' in metrics and "ts_inference_requests_total" in metrics
    _drop(client, "D013")


@pytest.mark.services
def test_adapted_v2_becomes_default_for_its_region_only(server, world):
    deployer = _deployer(server, world)
    assert deployer.sync("D040") == 0  # another region, on the source model
    v1 = world.adapted("D067", 0, prior=4.0)
    assert deployer.rollout("D067", v1, world.context("D067")).step is RolloutStep.PROMOTED
    v2 = world.adapted("D067", v1, prior=2.0)
    event = deployer.rollout("D067", v2, world.context("D067"))
    assert event.step is RolloutStep.PROMOTED and event.previous == v1
    client = deployer.client
    assert client.default_version("landcover-D067") == v2
    assert (world.registry.current("D067"), world.registry.previous("D067")) == (v2, v1)
    assert client.default_version("landcover-D040") == 0 and client.versions("landcover-D040") == [0]
    assert world.registry.current("D040") == 0
    out = TorchServePredictor(client).predict("D040", [world.tiles["D040"][0].image])[0]
    assert out.version == 0
    # an explicit rollback serves v1 again, by TorchServe default and registry alias
    back = deployer.rollback("D067")
    assert (back.step, back.version, back.previous) == (RolloutStep.ROLLED_BACK, v1, v2)
    assert client.default_version("landcover-D067") == v1 and world.registry.current("D067") == v1
    _drop(client, "D067")
    _drop(client, "D040")


@pytest.mark.services
def test_broken_version_is_refused_by_the_shadow_check(server, world):
    deployer = _deployer(server, world)
    v1 = world.adapted("D029", 0, prior=4.0)
    assert deployer.rollout("D029", v1, world.context("D029")).step is RolloutStep.PROMOTED
    bad = world.broken("D029", v1)
    event = deployer.rollout("D029", bad, world.context("D029"))
    assert event.step is RolloutStep.SHADOW_FAILED and "class collapse" in event.detail
    client = deployer.client
    assert client.default_version("landcover-D029") == v1 and world.registry.current("D029") == v1
    assert bad not in client.versions("landcover-D029")  # unregistered...
    assert not archive_path(server.model_store, "D029", bad).exists()
    assert world.registry.manifest("D029", bad).method == "broken"  # ...but kept in the registry
    _drop(client, "D029")


@pytest.mark.services
def test_failed_post_rollout_check_rolls_back_then_old_versions_are_pruned(server, world):
    region, name = "D074", "landcover-D074"
    alarms = {"version": -1}
    deployer = _deployer(
        server,
        world,
        config=RolloutConfig(keep_versions=3),
        post_checks=[lambda r, v: "error rate 12% > 5%" if v == alarms["version"] else None],
    )
    v1 = world.adapted(region, 0, prior=4.0)
    v2 = world.adapted(region, v1, prior=2.0)
    v3 = world.adapted(region, v2, prior=1.0)
    alarms["version"] = v3
    for v in (v1, v2):
        assert deployer.rollout(region, v, world.context(region)).step is RolloutStep.PROMOTED
    event = deployer.rollout(region, v3, world.context(region))
    assert (event.step, event.version, event.previous) == (RolloutStep.ROLLED_BACK, v2, v3)
    assert "error rate" in event.detail
    client = deployer.client
    assert client.default_version(name) == v2 and world.registry.current(region) == v2
    # one more good version: 0 (source), v4 (current), v2 (previous) are protected; v1 goes
    v4 = world.adapted(region, v2, prior=3.0)
    assert deployer.rollout(region, v4, world.context(region)).step is RolloutStep.PROMOTED
    pruned = [e.version for e in deployer.events if e.step is RolloutStep.PRUNED]
    assert pruned == [v1]
    assert set(client.versions(name)) == {0, v2, v4}
    assert not archive_path(server.model_store, region, v1).exists()
    assert archive_path(server.model_store, region, 0).exists()  # source archive kept
    assert world.registry.manifest(region, v1).version == v1  # weights kept (prune_registry off)
    _drop(client, region)


@pytest.mark.services
def test_auth_is_enforced(server):
    for url in (f"{server.config.inference_url}/ping", f"{server.config.management_url}/models"):
        response = httpx.get(url, timeout=10)
        assert response.status_code == 400 and "InvalidKeyException" in response.text
    with pytest.raises(TorchServeAuthError):
        server.client(config={"key_file": None}).models()
    # a key regenerated by someone else is picked up from the key file
    client = server.client()
    assert client.ping()
    api_key = json.loads(server.config.key_file.read_text())["API"]["key"]
    httpx.get(
        f"{server.config.management_url}/token",
        params={"type": "inference"},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10,
    ).raise_for_status()
    assert client.ping()


@pytest.mark.services
def test_object_uri_is_read_by_the_handler(server, world):
    endpoint = os.environ.get("TERRADAPT_S3__ENDPOINT") or os.environ.get("TERRADAPT_S3_ENDPOINT")
    assert endpoint, "TERRADAPT_S3__ENDPOINT unset: run `make test` (it starts MinIO and exports its settings)"
    from minio import Minio

    def env(name):
        return os.environ.get(f"TERRADAPT_S3__{name}") or os.environ.get(f"TERRADAPT_S3_{name}")

    s3 = Minio(endpoint, env("ACCESS_KEY"), env("SECRET_KEY"), secure=(env("SECURE") or "false") == "true")
    bucket = "terradapt-test-torchserve"
    if not s3.bucket_exists(bucket):
        s3.make_bucket(bucket)
    image = world.tiles["D033"][0].image
    data = encode_tile(image)
    import io

    s3.put_object(bucket, "D033/tile.tif", io.BytesIO(data), len(data))
    deployer = _deployer(server, world)
    deployer.sync("D033")
    predictor = TorchServePredictor(deployer.client)
    by_uri = predictor.predict_uri("D033", f"s3://{bucket}/D033/tile.tif")
    by_bytes = predictor.predict("D033", [image])[0]
    np.testing.assert_array_equal(by_uri.class_map, by_bytes.class_map)
    with pytest.raises(PredictionRejectedError) as caught:
        predictor.predict_uri("D033", f"s3://{bucket}/D033/missing.tif")
    assert caught.value.status == 404
    _drop(deployer.client, "D033")


@pytest.mark.services
def test_rollout_gate_and_policy_come_from_settings_and_the_context(server, world, monkeypatch):
    """The TorchServe shadow check judges with ``adaptation.gate``, ``torchserve.rollout`` and the job's context."""
    from stream.build import predictor_and_deployer
    from stream.config import load_settings

    env = {
        "RUNTIME__PREDICTOR": "torchserve",
        "TORCHSERVE__INFERENCE_URL": server.config.inference_url,
        "TORCHSERVE__MANAGEMENT_URL": server.config.management_url,
        "TORCHSERVE__METRICS_URL": server.config.metrics_url,
        "TORCHSERVE__KEY_FILE": str(server.config.key_file),
        "TORCHSERVE__MODEL_STORE": str(server.model_store),
        "ADAPTATION__GATE__MIN_AGREEMENT": "1.0",
    }
    for k, v in env.items():
        monkeypatch.setenv(f"TERRADAPT_{k}", v)
    _, strict = predictor_and_deployer(load_settings(), world.registry)
    assert isinstance(strict, TorchServeDeployer) and strict.gate.min_agreement == 1.0
    region = "D040"  # after the test that checks D040 still serves the source
    v1 = world.adapted(region, 0, prior=4.0)
    refused = strict.rollout(region, v1, world.context(region))
    assert refused.step is RolloutStep.SHADOW_FAILED and "low agreement" in refused.detail
    # the same gate with the job's label-shift estimate in the context: the candidate moves toward it, a repair
    candidate = InProcessPredictor(world.registry, device="cpu").predict(region, list(world.images(region)), v1)
    mix = np.mean([o.features.class_shares for o in candidate], axis=0)
    promoted = strict.rollout(region, v1, world.context(region, label_shift=tuple(float(x) for x in mix)))
    assert promoted.step is RolloutStep.PROMOTED, promoted.detail
    monkeypatch.setenv("TERRADAPT_TORCHSERVE__ROLLOUT__MIN_SHADOW_TILES", "100")
    _, cautious = predictor_and_deployer(load_settings(), world.registry)
    v2 = world.adapted(region, v1, prior=2.0)
    event = cautious.rollout(region, v2, world.context(region))
    assert event.step is RolloutStep.SHADOW_FAILED and "needs 100" in event.detail
    _drop(strict.client, region)


@pytest.mark.services
def test_restart_mid_stream_retries_then_raises_then_recovers(server, world):
    """The last test of the module: it stops and restarts the server (TorchServe forgets every model)."""
    deployer = _deployer(server, world)
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(s)

    client = server.client(config={"retries": 3}, backoff_s=0.05, sleep=sleep)
    predictor = TorchServePredictor(client, on_missing=deployer.sync)
    stream = [t.image for t in world.tiles["D033"]]
    assert predictor.predict("D033", stream[:2])[0].version == 0  # on_missing registered the source model
    server.script("stop")
    t0 = time.perf_counter()
    with pytest.raises(TorchServeUnavailableError) as caught:
        predictor.predict("D033", stream[2:3])
    assert sleeps == [0.05, 0.1, 0.2]  # 3 retries, exponential backoff, then a typed error to dead-letter
    assert isinstance(caught.value, TerradaptError) and time.perf_counter() - t0 < 5
    # with enough retries the client bridges a restart: new tokens are read, missing models re-registered
    starter = threading.Thread(target=server.script, args=("start",))
    patient = server.client(config={"retries": 12}, backoff_s=0.25, max_backoff_s=2.0)
    starter.start()
    try:
        outputs = TorchServePredictor(patient, on_missing=deployer.sync).predict("D033", stream[3:5])
    finally:
        starter.join()
    assert [o.version for o in outputs] == [0, 0]
    assert server.script("status").returncode == 0


@pytest.fixture(scope="module")
def smp_world(tmp_path_factory, world):
    """The same regions' tiles, served by a segmentation-models-pytorch model (Unet + resnet18)."""
    from tests.fakes.archs import toy_model

    source = _bn(toy_model("smp-unet-resnet18", seed=1), world.images("D033"), prior=0.0).eval()
    registry = ModelRegistry(FileSystemStore(tmp_path_factory.mktemp("smp-registry")))
    weights, manifest = encode(source, ModelManifest(config={}, classes=tuple("abcd"), bands=tuple("rgbne")))
    registry.publish_source(weights, ModelManifest.model_validate_json(manifest))
    return World(registry, world.tiles, source)


@pytest.mark.services
def test_an_smp_model_is_packaged_served_and_rolled_out(server, smp_world):
    """The archive carries the code the smp model needs (terradapt.architectures); TorchServe serves it like the
    in-process predictor, and an adapted version goes through the shadow check to default."""
    region = "D040"
    deployer = _deployer(server, smp_world)
    v1 = smp_world.publish(region, _bn(smp_world.source, smp_world.images(region), prior=4.0), 0)
    assert smp_world.registry.manifest(region, v1).architecture == "smp"
    event = deployer.rollout(region, v1, smp_world.context(region))
    assert event.step is RolloutStep.PROMOTED, event.detail
    images = list(smp_world.images(region)[:3])
    served = TorchServePredictor(deployer.client).predict(region, images)
    local = InProcessPredictor(smp_world.registry, device="cpu").predict(region, images)
    for s, loc in zip(served, local, strict=True):
        assert s.version == loc.version == v1
        np.testing.assert_array_equal(s.class_map, loc.class_map)
        assert s.features.deep.shape == (512,)
        np.testing.assert_allclose(s.features.deep, loc.features.deep, rtol=1e-4, atol=1e-5)
    _drop(deployer.client, region)
