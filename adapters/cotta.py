"""CoTTA: continual test-time adaptation (Wang et al., CVPR 2022), for segmentation.

Why: on a never-ending stream, a model that learns from its own predictions accumulates its errors and forgets
the source. CoTTA (1) learns from an exponential-moving-average *teacher*, whose pseudo-labels are smoother
than the student's own; (2) averages the teacher's per-pixel probabilities over flips (each flipped back), which
removes part of the noise of a single view; (3) after every step restores a random ``restore_prob`` share of the
student's weights to their source values, so knowledge the stream does not exercise cannot drift away. All
weights of the student train (CoTTA is not limited to BatchNorm); the teacher is the model that is deployed
(``self.model``), so every parameter and every BatchNorm statistic may change.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field

from adapters.base import Adapter, AdapterConfig
from adapters.common import BN_STATS, PooledBNStats, flip_averaged_probs, restart_running_stats
from terradapt.model import SegmentationModel


class CoTTAConfig(AdapterConfig):
    """Config of CoTTA."""

    lr: float = Field(default=1e-4, gt=0)
    ema: float = Field(default=0.99, ge=0, lt=1, description="teacher = ema x teacher + (1 - ema) x student")
    restore_prob: float = Field(default=0.01, ge=0, le=1, description="share of weights restored per step")


class CoTTA(Adapter):
    """EMA teacher with flip-averaged pseudo-labels, a fully trained student and stochastic restore."""

    name = "cotta"
    config_class = CoTTAConfig
    config: CoTTAConfig

    def configure(self, model: SegmentationModel) -> None:
        model.train()
        model.requires_grad_(False)  # the teacher (deployed model) only moves by EMA
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        previous = getattr(self, "pooled", None)
        if previous is not None:  # detach before copying, or the student would carry the teacher's hooks
            previous.remove()
        self.student = copy.deepcopy(model)
        self.pooled = PooledBNStats(model)  # the student's statistics are never deployed: only the teacher's
        self.student.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=self.config.lr)
        self._fresh = True

    def changed_names(self) -> set[str]:
        params = {n for n, _ in self.model.named_parameters()}
        return params | {n for n, _ in self.model.named_buffers() if n.rsplit(".", 1)[-1] in BN_STATS}

    def adapt_step(self, batch: torch.Tensor) -> None:
        self._step(batch)
        self.pooled.write()  # after backward: autograd saved the running-stat tensors of this step

    def _step(self, batch: torch.Tensor) -> None:
        self.model.train()
        self.student.train()
        if self._fresh:
            restart_running_stats(self.model)
            restart_running_stats(self.student)
            self._fresh = False
        with torch.no_grad():
            target = flip_averaged_probs(self.model, batch)
        log_p = self.student(batch).log_softmax(dim=1)
        loss = -(target * log_p).sum(dim=1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        device = batch.device
        with torch.no_grad():
            teacher = dict(self.model.named_parameters())
            for n, p in self.student.named_parameters():
                teacher[n].mul_(self.config.ema).add_(p, alpha=1 - self.config.ema)
                if self.config.restore_prob > 0:  # stochastic restore of the student to source
                    mask = torch.rand(p.shape, device=device) < self.config.restore_prob
                    p.copy_(torch.where(mask, self.source_state[n].to(device), p))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["student"] = {k: v.clone() for k, v in self.student.state_dict().items()}
        state["fresh"] = self._fresh
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.student.load_state_dict(state["student"])
        self._fresh = bool(state["fresh"])
