"""One adaptation job: adapt the region's current model on its recent tiles, then gate the candidate.

Pure compute with no I/O: the caller (embedded runner or adapt-worker) fetches tiles and publishes the result.
Runs on cuda when available.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field

from adapters.buffer import BufferedTile
from adapters.gate import Gate, GateConfig, GateResult
from adapters.registry import available_adapters, create_adapter
from terradapt.checkpoint import ModelManifest, encode
from terradapt.model import UNet, select_device
from terradapt.records import AdaptationJob
from terradapt.settings import StrictModel


def _known_method(method: str) -> str:
    if method not in available_adapters():
        raise ValueError(f"method={method!r}; accepted: {', '.join(available_adapters())}")
    return method


class RegionMethod(StrictModel):
    """The method of one region when it differs from the default."""

    method: str
    method_config: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, _: Any) -> None:
        """Reject unknown methods early, listing the valid ones."""
        _known_method(self.method)


class AdaptationConfig(StrictModel):
    """Which method adapts (by default, and per region), on how much data, and the gate it must pass."""

    method: str = "bn"
    method_config: dict[str, Any] = Field(default_factory=dict)
    per_region: dict[str, RegionMethod] = Field(
        default_factory=dict, description='e.g. {"D013": {"method": "tent"}}: overrides method and method_config'
    )
    batch_size: int = Field(default=4, ge=1)
    epochs: int = Field(default=1, ge=1, description="passes over the buffered tiles")
    device: str = "auto"
    gate: GateConfig = Field(default_factory=GateConfig)

    def model_post_init(self, _: Any) -> None:
        """Reject unknown methods early, listing the valid ones."""
        _known_method(self.method)

    def method_for(self, region: str) -> RegionMethod:
        """The method (and its config) a region adapts with."""
        return self.per_region.get(region) or RegionMethod(method=self.method, method_config=self.method_config)


@dataclass(frozen=True)
class AdaptationOutcome:
    """The candidate version (weights + manifest, gate decision inside) and the gate result."""

    model: UNet
    weights: bytes
    manifest: ModelManifest
    gate: GateResult


def _batches(tiles: torch.Tensor, batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(tiles.shape[0], generator=g)
        for i in range(0, len(order), batch_size):
            yield tiles[order[i : i + batch_size]]


def run_adaptation(
    job: AdaptationJob,
    base: UNet,
    base_manifest: ModelManifest,
    tiles: Sequence[BufferedTile],
    config: AdaptationConfig,
    *,
    source_tiles: torch.Tensor | None = None,
    current: UNet | None = None,
) -> AdaptationOutcome:
    """Adapt ``base`` with ``config.method`` on ``tiles``, gate it, and build its manifest.

    The gate compares the candidate with ``current`` (the version the region serves), ``base`` when not given.
    ``source_tiles`` (N, C, H, W) feed the methods that replay source data (coral, dann; eata's Fisher).
    """
    if not tiles:
        raise ValueError("an adaptation job needs at least one tile")
    device = select_device(config.device)
    torch.manual_seed(zlib.crc32(job.job_id.encode()))
    x = torch.from_numpy(np.stack([t.image for t in tiles])).float().to(device)
    base = base.to(device).eval()
    chosen = config.method_for(job.region)
    method = job.method or chosen.method
    method_config = chosen.method_config if method == chosen.method else {}
    adapter = create_adapter(method, base, method_config, source_tiles=source_tiles)
    candidate = adapter.adapt(_batches(x, config.batch_size, config.epochs, seed=len(tiles)))
    masks = [t.mask for t in tiles]
    reference = base if current is None else current.to(device).eval()
    prior = base_manifest.class_prior or None
    gate = Gate(config.gate)
    result = gate.check(candidate, reference, x, masks, job.label_shift, prior, covariate=job.trigger.covariate)
    manifest = base_manifest.model_copy(
        update={
            "region": job.region,
            "parent": job.base_version,
            "method": adapter.name,
            "gate_accepted": result.accepted,
            "gate_reasons": result.reasons,
            "gate_metrics": result.metrics,
            "data_window": tuple(t.acquisition_id for t in tiles),
            "job_id": job.job_id,
            "metrics": {},
        }
    )
    candidate = candidate.cpu()
    weights, manifest_json = encode(candidate, manifest)
    return AdaptationOutcome(candidate, weights, ModelManifest.model_validate_json(manifest_json), result)


def reset_to_source(
    job: AdaptationJob, source: UNet, source_manifest: ModelManifest, tiles: Sequence[BufferedTile]
) -> AdaptationOutcome:
    """A version that serves the source weights again (the region's shift went away).

    Published like any version (new number, lineage, data window), so rollout, canary and rollback treat it the
    same; the source model is the validated baseline, so it needs no label-free gate.
    """
    result = GateResult(accepted=True, reasons=(), metrics={"reset_to_source": 1.0, "tiles": float(len(tiles))})
    manifest = source_manifest.model_copy(
        update={
            "region": job.region,
            "parent": job.base_version,
            "method": "source",
            "gate_accepted": True,
            "gate_reasons": (),
            "gate_metrics": result.metrics,
            "data_window": tuple(t.acquisition_id for t in tiles),
            "job_id": job.job_id,
            "metrics": {},
        }
    )
    weights, manifest_json = encode(source.cpu(), manifest)
    return AdaptationOutcome(source, weights, ModelManifest.model_validate_json(manifest_json), result)
