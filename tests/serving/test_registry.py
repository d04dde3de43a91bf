import pytest
import torch

from serving.registry import ModelRegistry
from serving.rollout import InProcessDeployer
from serving.store import FileSystemStore
from terradapt.checkpoint import ModelManifest, encode, load_checkpoint, save_checkpoint
from terradapt.errors import ChecksumMismatchError, ModelVersionNotFoundError, ObjectNotFoundError
from terradapt.model import UNet, UNetConfig

CFG = UNetConfig(in_channels=5, num_classes=4, base_channels=4, depth=2)


def _manifest(**kw):
    return ModelManifest(config=CFG.to_dict(), classes=("a", "b", "c", "d"), bands=("r", "g", "b", "n", "e"), **kw)


@pytest.fixture
def registry(tmp_path):
    reg = ModelRegistry(FileSystemStore(tmp_path / "reg"))
    torch.manual_seed(0)
    weights, manifest = encode(UNet(CFG), _manifest())
    reg.publish_source(weights, ModelManifest.model_validate_json(manifest))
    return reg


def test_checkpoint_round_trip_and_sha_check(tmp_path):
    model = UNet(CFG)
    saved = save_checkpoint(tmp_path / "ck", model, _manifest())
    loaded, manifest = load_checkpoint(tmp_path / "ck")
    assert manifest.sha256 == saved.sha256
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    (tmp_path / "ck" / "weights.safetensors").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch"):
        load_checkpoint(tmp_path / "ck")


def test_versions_aliases_and_idempotent_publish(registry):
    assert registry.current("D013") == 0
    weights, manifest = encode(UNet(CFG), _manifest(region="D013", parent=0, method="bn", job_id="job-1"))
    v1 = registry.publish(weights, ModelManifest.model_validate_json(manifest))
    again = registry.publish(weights, ModelManifest.model_validate_json(manifest))
    assert (v1.version, again.version) == (1, 1)
    assert len(registry.history("D013")) == 1
    deployer = InProcessDeployer(registry)
    deployer.rollout("D013", 1)
    assert (registry.current("D013"), registry.previous("D013")) == (1, 0)
    assert registry.current("D033") == 0  # other regions untouched
    _, m = registry.load("D013")
    assert m.version == 1 and m.parent == 0
    deployer.rollback("D013")
    assert registry.current("D013") == 0


def test_missing_version_and_protected_deletes(registry):
    with pytest.raises(ModelVersionNotFoundError):
        registry.load("D013", 7)
    with pytest.raises(ValueError, match="source"):
        registry.delete("D013", 0)


def test_registry_detects_tampered_weights(registry, tmp_path):
    registry.store.put("models/source/0/weights.safetensors", b"not the weights")
    with pytest.raises(ChecksumMismatchError):
        registry.load("D033", 0)


def test_store_rejects_escaping_keys_and_reports_missing(tmp_path):
    store = FileSystemStore(tmp_path)
    with pytest.raises(ValueError, match="escapes"):
        store.put("../outside", b"x")
    with pytest.raises(ObjectNotFoundError):
        store.get("nope")
