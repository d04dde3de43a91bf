"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022), for segmentation.

Why: TENT trusts every pixel, and high-entropy pixels give noisy, harmful gradients; a long stream also slowly
forgets the source task. EATA (1) keeps only reliable pixels (entropy below ``entropy_margin x ln K``) and
weights them by ``exp(E0 - E)`` so confident pixels count more, (2) skips tiles whose mean prediction repeats
the recent ones (cosine similarity above ``redundancy_margin``: no new information, only drift), and (3) adds
an anti-forgetting anchor ``alpha * sum F_i (theta_i - theta_i^source)^2``. F is the diagonal Fisher measured
on source tiles when they are given (``source_tiles=``, pseudo-label cross-entropy as in the paper); without
them F = 1, a plain L2 anchor to the source weights (F is normalised to mean 1 either way). Only BatchNorm
scale/shift train (and its statistics).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch.nn import functional as F  # noqa: N812

from adapters.base import AdapterConfig
from adapters.common import (
    PooledBNStats,
    configure_bn_training,
)
from adapters.pooled import PooledBNAdapter
from terradapt.metrics import pixel_entropy
from terradapt.model import SegmentationModel


class EATAConfig(AdapterConfig):
    """Config of EATA."""

    lr: float = Field(default=1e-3, gt=0)
    entropy_margin: float = Field(default=0.4, gt=0, le=1, description="reliable if entropy < margin x ln K")
    redundancy_margin: float = Field(default=0.995, gt=0, le=1, description="skip tiles this similar to recent")
    anchor_weight: float = Field(default=1.0, ge=0, description="alpha of the Fisher / L2 anchor")


class EATA(PooledBNAdapter):
    """Reliable, non-redundant entropy minimisation with a Fisher (or L2) anchor to the source weights."""

    name = "eata"
    config_class = EATAConfig
    config: EATAConfig
    source_replay = "optional"

    def configure(self, model: SegmentationModel) -> None:
        self.params = configure_bn_training(model)
        self.pooled = PooledBNStats(model, replaces=getattr(self, "pooled", None))
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor = {n: p.detach().clone() for n, p in self.named.items()}
        if not hasattr(self, "fisher"):  # the Fisher depends on the source only: computed once, kept by reset
            self.fisher = self._fisher(model)
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.lr)
        self._fresh = True
        self._mean_prob: torch.Tensor | None = None

    def _fisher(self, model: SegmentationModel) -> dict[str, torch.Tensor]:
        if self.source_tiles is None:
            return {n: torch.ones_like(p) for n, p in self.named.items()}
        fisher = {n: torch.zeros_like(p) for n, p in self.named.items()}
        model.eval()  # source statistics: the Fisher of the source model on source data
        tiles = self.source_tiles.float().to(next(model.parameters()).device)
        for tile in torch.split(tiles, 1):
            logits = model(tile)
            loss = F.cross_entropy(logits, logits.argmax(dim=1))
            model.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            for n, p in self.named.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / tiles.shape[0]
        model.zero_grad(set_to_none=True)
        model.train()
        # normalised to mean 1, so ``anchor_weight`` means the same with and without source tiles
        scale = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-12)
        return {n: f / scale for n, f in fisher.items()}

    def _step(self, batch: torch.Tensor) -> None:
        logits = self.model(batch)
        ent = pixel_entropy(logits)
        e0 = self.config.entropy_margin * math.log(logits.shape[1])
        keep = ent < e0
        probs = logits.softmax(dim=1).mean(dim=(2, 3)).detach()  # per-tile mean prediction (N, K)
        if self._mean_prob is not None:
            similar = F.cosine_similarity(probs, self._mean_prob[None], dim=1) > self.config.redundancy_margin
            keep &= ~similar[:, None, None]
        tile_mean = probs.mean(dim=0)
        self._mean_prob = tile_mean if self._mean_prob is None else 0.9 * self._mean_prob + 0.1 * tile_mean
        if not bool(keep.any()):
            return  # BN running statistics were still updated by the forward pass
        weight = torch.exp(e0 - ent.detach())[keep]
        loss = (ent[keep] * weight).sum() / weight.sum()
        anchor = sum(
            ((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in self.named.items()),
            torch.zeros((), device=batch.device),
        )
        loss = loss + self.config.anchor_weight * anchor
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["mean_prob"] = None if self._mean_prob is None else self._mean_prob.clone()
        state["fresh"] = self._fresh
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._mean_prob, self._fresh = state["mean_prob"], bool(state["fresh"])
