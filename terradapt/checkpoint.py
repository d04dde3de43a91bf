"""Checkpoint format: ``weights.safetensors`` + ``manifest.json`` (never a pickle).

The manifest records what a reader needs to rebuild and trust the model: architecture and its config (bands,
classes), the input normalisation and the per-class source look (data beside the weights, not model buffers),
classes, bands, lineage (region, version, parent, method), training regions, metrics, and the sha256 of the weights
file, which is verified on every load. The weights file holds exactly the network's state dict.

Format 1 (before other architectures) stored the normalisation and class look as buffers in the weights and the
small U-Net's layers at the top level; ``decode`` still reads it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from terradapt.architectures import architecture_of, build_model, parse_config
from terradapt.errors import ChecksumMismatchError
from terradapt.model import ArchConfig, SegmentationModel
from terradapt.records import utcnow

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"


class ModelManifest(BaseModel):
    """What is stored beside the weights of one model version."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = 2
    architecture: str = "unet"
    config: dict[str, int | str]
    input_mean: tuple[float, ...] = ()  # per-band normalisation in raw band units (format 2; format 1: in weights)
    input_std: tuple[float, ...] = ()
    class_band_mean: tuple[tuple[float, ...], ...] = ()  # source mean of every band per class, 0..1 (radiometry)
    source_checkpoint: str | None = None  # sha256 of the user checkpoint this was imported from (import-model)
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

    def arch_config(self) -> ArchConfig:
        """The typed architecture config this manifest describes."""
        return parse_config(self.architecture, dict(self.config))


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    """Check weights bytes against the sha256 their manifest records (every load of every task does).

    Raises:
        ChecksumMismatchError: the bytes hash to something else (``what`` names them in the message).

    """
    actual = sha256_hex(data)
    if actual != expected:
        raise ChecksumMismatchError(what, expected, actual)


def write_version_files(directory: Path, weights: bytes, manifest_json: bytes) -> None:
    """Write weights, then the manifest (last: it marks the version complete), each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_FILE, weights)
    _atomic_write(directory / MANIFEST_FILE, manifest_json)


def read_version_files(directory: Path) -> tuple[bytes, bytes]:
    """(weights bytes, manifest JSON bytes) of a checkpoint directory, unverified (``decode`` checks them)."""
    return (directory / WEIGHTS_FILE).read_bytes(), (directory / MANIFEST_FILE).read_bytes()


def weights_to_bytes(model: torch.nn.Module) -> bytes:
    """Serialize a model's state dict as safetensors bytes (tensors made contiguous, on CPU)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def model_data(model: SegmentationModel) -> dict[str, object]:
    """What the manifest stores about a model besides its weights: architecture, config, normalisation, look."""
    return {
        "format_version": 2,
        "architecture": architecture_of(model.config),
        "config": model.config.to_dict(),
        "input_mean": tuple(float(v) for v in model.input_mean.cpu()),
        "input_std": tuple(float(v) for v in model.input_std.cpu()),
        # all zeros = never measured (an imported model): left empty, for labelled calibration tiles to fill
        "class_band_mean": tuple(tuple(float(v) for v in row) for row in model.class_band_mean.cpu())
        if bool(model.class_band_mean.any())
        else (),
    }


def encode(model: SegmentationModel, manifest: ModelManifest) -> tuple[bytes, bytes]:
    """Return (weights bytes, manifest JSON bytes) with the manifest's sha256 set to the weights' hash."""
    weights = weights_to_bytes(model)
    stamped = manifest.model_copy(update={"sha256": sha256_hex(weights), **model_data(model)})
    return weights, stamped.model_dump_json(indent=2).encode()


def decode(
    weights: bytes, manifest_json: bytes | str, *, what: str = "weights"
) -> tuple[SegmentationModel, ModelManifest]:
    """Verify the sha256, rebuild the architecture, load the weights (strict) and the manifest's data."""
    manifest = ModelManifest.model_validate_json(manifest_json)
    verify_sha256(weights, manifest.sha256, what)
    model = build_model(manifest.architecture, dict(manifest.config))
    state = st_load(weights)
    if manifest.format_version == 1:  # buffers in the weights, the U-Net's layers at the top level
        model.set_normalisation(state.pop("input_mean"), state.pop("input_std"))
        model.set_class_band_mean(state.pop("class_band_mean"))
        state = {f"net.{k}": v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    apply_manifest_data(model, manifest)
    model.eval()
    return model, manifest


def apply_manifest_data(model: SegmentationModel, manifest: ModelManifest) -> None:
    """Set the normalisation and class look a manifest stores (those it leaves empty keep the model's)."""
    if manifest.input_mean and manifest.input_std:
        model.set_normalisation(manifest.input_mean, manifest.input_std)
    if manifest.class_band_mean:
        model.set_class_band_mean(manifest.class_band_mean)


def save_checkpoint(directory: Path, model: SegmentationModel, manifest: ModelManifest) -> ModelManifest:
    """Write weights then manifest into ``directory`` (manifest last: it marks the version complete)."""
    weights, manifest_json = encode(model, manifest)
    write_version_files(directory, weights, manifest_json)
    return ModelManifest.model_validate_json(manifest_json)


def load_checkpoint(directory: Path) -> tuple[SegmentationModel, ModelManifest]:
    """Load and verify a checkpoint directory."""
    return decode(*read_version_files(directory), what=str(directory / WEIGHTS_FILE))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
