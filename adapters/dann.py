"""DANN: domain-adversarial alignment with replayed source tiles (Ganin et al., JMLR 2016), for segmentation.

Why: CORAL matches only covariances; an adversary can find any difference between source and target features
that a small classifier can see. A domain classifier (two linear layers) learns to tell source from target on
the pooled deep features (``SegmentationModel.forward_features``); a gradient-reversal layer sends the *opposite*
of its gradient into the network, so the network's BatchNorm scale/shift move to make the domains indistinguishable.
Source tiles pass through with their own batch statistics and do not enter the target running statistics.
The domain classifier is adapter state (``state_dict``), not part of the deployed model.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adapters.base import AdapterConfig
from adapters.common import (
    PooledBNStats,
    SourceReplay,
    configure_bn_training,
    frozen_running_stats,
)
from adapters.pooled import PooledBNAdapter
from terradapt.model import SegmentationModel


class DANNConfig(AdapterConfig):
    """Config of DANN."""

    lr: float = Field(default=1e-3, gt=0)
    reversal: float = Field(default=0.1, ge=0, description="weight of the reversed gradient")
    hidden: int = Field(default=16, ge=1)
    source_batch: int = Field(default=2, ge=1, description="source tiles replayed per step")
    seed: int = 0


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grads[0], None


class DANN(PooledBNAdapter):
    """Gradient reversal from a small domain classifier on pooled bottleneck features."""

    name = "dann"
    config_class = DANNConfig
    config: DANNConfig
    source_replay = "required"

    def configure(self, model: SegmentationModel) -> None:
        if self.source_tiles is None:  # checked in Adapter.__init__; narrows the type
            raise ValueError("dann needs source_tiles")
        self.replay = SourceReplay(self.source_tiles, self.name, self.config.seed)
        width = model.feature_dim
        with torch.random.fork_rng(devices=[]):  # seeded critic without touching the global RNG
            torch.manual_seed(self.config.seed)
            hidden = self.config.hidden
            self.critic = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.critic.to(next(model.parameters()).device)
        params = configure_bn_training(model) + list(self.critic.parameters())
        self.pooled = PooledBNStats(model, replaces=getattr(self, "pooled", None))
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr)
        self._fresh = True

    def _step(self, batch: torch.Tensor) -> None:
        _, target = self.model.forward_features(batch)
        with frozen_running_stats(self.model):
            _, source = self.model.forward_features(self.replay.sample(self.config.source_batch, batch.device))
        feats = torch.cat([source, target])
        domain = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(batch.device)
        reversed_feats = _GradReverse.apply(feats, self.config.reversal)
        loss = F.binary_cross_entropy_with_logits(self.critic(reversed_feats).squeeze(1), domain)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            fresh=self._fresh,
            critic={k: v.clone() for k, v in self.critic.state_dict().items()},
            generator=self.replay.generator.get_state(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fresh = bool(state["fresh"])
        self.critic.load_state_dict(state["critic"])
        self.replay.generator.set_state(state["generator"])
