"""DeepCORAL with replayed source tiles (Sun & Saenko, ECCV-W 2016), for segmentation.

Why: when a few unlabelled source tiles may be kept on the edge, the target features can be aligned with the
*source features themselves* rather than with a proxy such as low entropy. CORAL matches second-order
statistics: the loss is ``||C_s - C_t||_F^2 / (4 d^2)`` between the covariances of bottleneck features, where
every bottleneck pixel is a sample (so even one 64 px tile gives 64 samples at depth 3, 256 at depth 2). Source
tiles pass through with their own batch statistics and do not enter the target running statistics. Only
BatchNorm scale/shift train (and its statistics), so alignment cannot rewrite what the filters detect.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from adapters.base import AdapterConfig
from adapters.common import (
    PooledBNStats,
    SourceReplay,
    configure_bn_training,
    frozen_running_stats,
)
from adapters.pooled import PooledBNAdapter
from terradapt.model import SegmentationModel


class CoralConfig(AdapterConfig):
    """Config of DeepCORAL."""

    lr: float = Field(default=1e-3, gt=0)
    source_batch: int = Field(default=2, ge=2, description="source tiles replayed per step")
    seed: int = 0


def bottleneck_pixels(model: SegmentationModel, batch: torch.Tensor) -> torch.Tensor:
    """Deep-feature activations of a batch as (pixels, channels) samples.

    The model's feature layer: the small U-Net's bottleneck, an smp encoder's deepest stage.
    """
    z = model.forward_feature_map(batch)[1]
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CORAL distance between the feature covariances of two (samples, d) sets."""
    d = source.shape[1]
    return (torch.cov(source.T) - torch.cov(target.T)).pow(2).sum() / (4 * d * d)


class DeepCoral(PooledBNAdapter):
    """Align target bottleneck feature covariance with replayed source tiles."""

    name = "coral"
    config_class = CoralConfig
    config: CoralConfig
    source_replay = "required"

    def configure(self, model: SegmentationModel) -> None:
        if self.source_tiles is None:  # checked in Adapter.__init__; narrows the type
            raise ValueError("coral needs source_tiles")
        self.replay = SourceReplay(self.source_tiles, self.name, self.config.seed)
        self.optimizer = torch.optim.Adam(configure_bn_training(model), lr=self.config.lr)
        self.pooled = PooledBNStats(model, replaces=getattr(self, "pooled", None))
        self._fresh = True

    def _step(self, batch: torch.Tensor) -> None:
        target = bottleneck_pixels(self.model, batch)
        with frozen_running_stats(self.model):
            source = bottleneck_pixels(self.model, self.replay.sample(self.config.source_batch, batch.device))
        loss = coral_loss(source, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(fresh=self._fresh, generator=self.replay.generator.get_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fresh = bool(state["fresh"])
        self.replay.generator.set_state(state["generator"])
