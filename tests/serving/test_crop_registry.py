"""The crop model registry: source as version 0, publish (idempotent per job), aliases, sha256-verified loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.crop_registry import CropRegistry
from serving.store import FileSystemStore, MemoryStore
from terradapt.checkpoint import WEIGHTS_FILE
from terradapt.crops.checkpoint import CropManifest, encode_crop
from terradapt.crops.model import PseLtae, PseLtaeConfig
from terradapt.crops.series import S2_BANDS
from terradapt.crops.synthetic import CROP_CLASSES
from terradapt.errors import ChecksumMismatchError, ModelVersionNotFoundError


def _model(offset: float = 0.0) -> PseLtae:
    torch.manual_seed(0)
    model = PseLtae(PseLtaeConfig(pse_hidden=8, pse_dim=16, d_model=16, n_head=2, d_k=4, temporal_dim=16))
    model.set_date_offset(offset)
    return model.eval()


def _encoded(model: PseLtae, **update: object) -> tuple[bytes, CropManifest]:
    base = CropManifest(config={}, classes=CROP_CLASSES, bands=S2_BANDS).model_copy(update=update)
    weights, manifest_json = encode_crop(model, base)
    return weights, CropManifest.model_validate_json(manifest_json)


@pytest.fixture(params=["fs", "memory"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> CropRegistry:
    store = FileSystemStore(tmp_path / "store") if request.param == "fs" else MemoryStore("models")
    registry = CropRegistry(store)
    registry.publish_source(*_encoded(_model()))
    return registry


def test_source_is_version_zero_of_every_region(registry: CropRegistry) -> None:
    assert registry.current("lv-1") == 0 and registry.previous("lv-1") is None
    model, manifest = registry.load("lv-1")
    assert manifest.region == "source" and manifest.version == 0 and float(model.date_offset) == 0.0
    assert registry.history("lv-1") == []


def test_publish_switch_and_idempotent_jobs(registry: CropRegistry) -> None:
    weights, manifest = _encoded(_model(-30.0), region="lv-1", parent=0, method="phenology-bn", job_id="job-1")
    v1 = registry.publish(weights, manifest)
    assert v1.version == 1 and v1.method == "phenology-bn" and v1.job_id == "job-1" and v1.href.endswith("lv-1/1")
    assert registry.publish(weights, manifest).version == 1  # a retried job returns its version
    registry.set_current("lv-1", 1)
    assert registry.current("lv-1") == 1 and registry.previous("lv-1") == 0
    assert registry.current("si-1") == 0  # lineages are per region
    model, loaded = registry.load("lv-1")
    assert float(model.date_offset) == -30.0 and loaded.sha256 == v1.sha256
    v2 = registry.publish(*_encoded(_model(-28.0), region="lv-1", parent=1, job_id="job-2"))
    assert v2.version == 2 and [m.version for m in registry.history("lv-1")] == [1, 2]


def test_missing_versions_and_tampered_weights_are_refused(registry: CropRegistry) -> None:
    with pytest.raises(ModelVersionNotFoundError):
        registry.load("lv-1", 3)
    with pytest.raises(ModelVersionNotFoundError):
        registry.set_current("lv-1", 3)
    weights, manifest = _encoded(_model(-30.0), region="lv-1")
    registry.publish(weights, manifest)
    other, _ = _encoded(_model(5.0))
    registry.store.put(f"crops/models/lv-1/1/{WEIGHTS_FILE}", other)
    with pytest.raises(ChecksumMismatchError):
        registry.load("lv-1", 1)
    with pytest.raises(ChecksumMismatchError):
        registry.publish(other, manifest)  # weights that do not match the manifest's sha256
