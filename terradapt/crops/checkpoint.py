"""Crop model checkpoints: ``weights.safetensors`` + ``manifest.json``, like the segmentation models (no pickle).

The weights file holds exactly the network's state dict (``date_offset`` included: an adapted phenology offset is
part of the version); the manifest holds the architecture and its config, the input normalisation, classes,
bands, lineage, training regions, the source class prior, metrics and the weights' sha256, verified on load.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load

from terradapt.architectures import ArchitectureError
from terradapt.checkpoint import (
    read_version_files,
    sha256_hex,
    verify_sha256,
    weights_to_bytes,
    write_version_files,
)
from terradapt.crops.model import CROP_ARCHITECTURES, CropModel, PseLtaeConfig
from terradapt.errors import UnknownNameError
from terradapt.records import utcnow

__all__ = ["CropManifest", "build_crop_model", "decode_crop", "encode_crop", "load_crop", "save_crop"]


class CropManifest(BaseModel):
    """What is stored beside the weights of one crop model version."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    task: str = "crops"
    architecture: str = "pse-ltae"
    config: dict[str, int | str]
    input_mean: tuple[float, ...] = ()
    input_std: tuple[float, ...] = ()
    classes: tuple[str, ...]
    bands: tuple[str, ...]
    region: str = "source"
    version: int = 0
    parent: int | None = None
    method: str = "source"
    training_regions: tuple[str, ...] = ()
    class_prior: tuple[float, ...] = ()
    metrics: dict[str, float] = Field(default_factory=dict)
    job_id: str | None = Field(default=None, description="the adaptation job that made this version (idempotence)")
    gate_accepted: bool = True
    gate_reasons: tuple[str, ...] = ()
    gate_metrics: dict[str, float] = Field(default_factory=dict)
    sha256: str = ""
    created: datetime = Field(default_factory=utcnow)


def build_crop_model(architecture: str, config: dict[str, Any]) -> CropModel:
    """Rebuild the (untrained) crop network a manifest names.

    Raises:
        UnknownNameError: the architecture is not a registered crop architecture.
        ArchitectureError: a config key the architecture does not know, or a value of the wrong type.

    """
    if architecture not in CROP_ARCHITECTURES:
        raise UnknownNameError("crop architecture", architecture, sorted(CROP_ARCHITECTURES))
    known = {f.name for f in dataclasses.fields(PseLtaeConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ArchitectureError(f"{architecture} config has unknown key(s) {unknown}; known: {sorted(known)}")
    bad = sorted(k for k, v in config.items() if not isinstance(v, int) or isinstance(v, bool))
    if bad:
        raise ArchitectureError(f"{architecture} config {bad}: expected integers")
    return CROP_ARCHITECTURES[architecture](PseLtaeConfig(**config))


def encode_crop(model: CropModel, manifest: CropManifest) -> tuple[bytes, bytes]:
    """(weights bytes, manifest JSON bytes), the manifest stamped with the weights' sha256 and the model's data."""
    weights = weights_to_bytes(model)
    stamped = manifest.model_copy(
        update={
            "sha256": sha256_hex(weights),
            "architecture": model.architecture,
            "config": model.config.to_dict(),
            "input_mean": tuple(float(v) for v in model.input_mean.cpu()),
            "input_std": tuple(float(v) for v in model.input_std.cpu()),
        }
    )
    return weights, stamped.model_dump_json(indent=2).encode()


def decode_crop(weights: bytes, manifest_json: bytes | str, *, what: str = "weights") -> tuple[CropModel, CropManifest]:
    """Verify the sha256, rebuild the network, load the weights (strict) and the normalisation; eval mode."""
    manifest = CropManifest.model_validate_json(manifest_json)
    verify_sha256(weights, manifest.sha256, what)
    model = build_crop_model(manifest.architecture, dict(manifest.config))
    model.load_state_dict(st_load(weights), strict=True)
    if manifest.input_mean and manifest.input_std:
        model.set_normalisation(manifest.input_mean, manifest.input_std)
    return model.eval(), manifest


def save_crop(directory: Path, model: CropModel, manifest: CropManifest) -> CropManifest:
    """Write weights, then the manifest (last: it marks the version complete), each atomically."""
    weights, manifest_json = encode_crop(model, manifest)
    write_version_files(directory, weights, manifest_json)
    return CropManifest.model_validate_json(manifest_json)


def load_crop(directory: Path) -> tuple[CropModel, CropManifest]:
    """Load and verify a crop checkpoint directory."""
    return decode_crop(*read_version_files(directory), what=str(directory))
