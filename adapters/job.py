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


class AdaptationConfig(StrictModel):
    """Which method adapts, on how much data, and the gate it must pass."""

    method: str = "bn"
    method_config: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=4, ge=1)
    epochs: int = Field(default=1, ge=1, description="passes over the buffered tiles")
    device: str = "auto"
    gate: GateConfig = Field(default_factory=GateConfig)

    def model_post_init(self, _: Any) -> None:
        """Reject unknown methods early, listing the valid ones."""
        if self.method not in available_adapters():
            raise ValueError(f"method={self.method!r}; accepted: {', '.join(available_adapters())}")


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
) -> AdaptationOutcome:
    """Adapt ``base`` with ``config.method`` on ``tiles``, gate it against ``base``, and build its manifest.

    ``source_tiles`` (N, C, H, W) feed the methods that replay source data (coral, dann; eata's Fisher).
    """
    if not tiles:
        raise ValueError("an adaptation job needs at least one tile")
    device = select_device(config.device)
    torch.manual_seed(zlib.crc32(job.job_id.encode()))
    x = torch.from_numpy(np.stack([t.image for t in tiles])).float().to(device)
    base = base.to(device).eval()
    adapter = create_adapter(job.method or config.method, base, config.method_config, source_tiles=source_tiles)
    candidate = adapter.adapt(_batches(x, config.batch_size, config.epochs, seed=len(tiles)))
    masks = [t.mask for t in tiles]
    result = Gate(config.gate).check(candidate, base, x, masks, job.label_shift, base_manifest.class_prior or None)
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
