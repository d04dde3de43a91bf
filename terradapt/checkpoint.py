"""Checkpoint format: ``weights.safetensors`` + ``manifest.json`` (never a pickle).

The manifest records what a reader needs to rebuild and trust the model: architecture, classes, bands,
normalisation, lineage (region, version, parent, method), training regions, metrics, and the sha256 of the
weights file, which is verified on every load.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from terradapt.errors import ChecksumMismatchError
from terradapt.model import UNet, UNetConfig
from terradapt.records import utcnow

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


class ModelManifest(BaseModel):
    """What is stored beside the weights of one model version."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    architecture: str = "unet"
    config: dict[str, int]
    classes: tuple[str, ...]
    bands: tuple[str, ...]
    region: str = "source"
    version: int = 0
    parent: int | None = None
    method: str = "source"
    training_regions: tuple[str, ...] = ()
    training_tiles: tuple[str, ...] = ()  # ids of the tiles the source model trained on (calibration must avoid them)
    protocol: str = "erm"  # source-training protocol (terradapt.protocols) the weights came from
    calibration_tiles: tuple[str, ...] = ()  # source tiles held out of training for calibration (registry-init)
    class_prior: tuple[float, ...] = ()  # source pixel share of every class (the gate's default reference)
    metrics: dict[str, float] = Field(default_factory=dict)
    gate_accepted: bool = True
    gate_reasons: tuple[str, ...] = ()
    gate_metrics: dict[str, float] = Field(default_factory=dict)
    data_window: tuple[str, ...] = ()
    labels_used: tuple[str, ...] = ()  # acquisition ids of the labelled tiles that trained this version (few-shot)
    job_id: str | None = None
    sha256: str = ""
    created: datetime = Field(default_factory=utcnow)

    def unet_config(self) -> UNetConfig:
        """The architecture config this manifest describes."""
        return UNetConfig(**self.config)


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def weights_to_bytes(model: torch.nn.Module) -> bytes:
    """Serialize a model's state dict as safetensors bytes (tensors made contiguous, on CPU)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def encode(model: UNet, manifest: ModelManifest) -> tuple[bytes, bytes]:
    """Return (weights bytes, manifest JSON bytes) with the manifest's sha256 set to the weights' hash."""
    weights = weights_to_bytes(model)
    stamped = manifest.model_copy(update={"sha256": sha256_hex(weights), "config": model.config.to_dict()})
    return weights, stamped.model_dump_json(indent=2).encode()


def decode(weights: bytes, manifest_json: bytes | str, *, what: str = "weights") -> tuple[UNet, ModelManifest]:
    """Verify the sha256, rebuild the architecture and load the weights (strict)."""
    manifest = ModelManifest.model_validate_json(manifest_json)
    actual = sha256_hex(weights)
    if actual != manifest.sha256:
        raise ChecksumMismatchError(what, manifest.sha256, actual)
    model = UNet(manifest.unet_config())
    model.load_state_dict(st_load(weights), strict=True)
    model.eval()
    return model, manifest


def save_checkpoint(directory: Path, model: UNet, manifest: ModelManifest) -> ModelManifest:
    """Write weights then manifest into ``directory`` (manifest last: it marks the version complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights, manifest_json = encode(model, manifest)
    _atomic_write(directory / WEIGHTS_FILE, weights)
    _atomic_write(directory / MANIFEST_FILE, manifest_json)
    return ModelManifest.model_validate_json(manifest_json)


def load_checkpoint(directory: Path) -> tuple[UNet, ModelManifest]:
    """Load and verify a checkpoint directory."""
    return decode(
        (directory / WEIGHTS_FILE).read_bytes(),
        (directory / MANIFEST_FILE).read_bytes(),
        what=str(directory / WEIGHTS_FILE),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
