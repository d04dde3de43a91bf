"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023), for segmentation.

Why: in the wild (small batches, mixed shifts, label shift) TENT can collapse to one class. SAR (1) drops
unreliable pixels (entropy above ``entropy_margin x ln K``), whose large gradients cause the collapse, (2)
takes a sharpness-aware step (SAM): the gradient is evaluated at the worst nearby point
``theta + rho g/||g||``, steering toward flat minima where noisy gradients do less damage, and (3) recovers:
when the moving average of the loss falls below ``reset_loss`` the model is over-confident (collapsing) and is
put back to the source weights. Only BatchNorm scale/shift train (and its statistics).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from adapters.base import Adapter, AdapterConfig
from adapters.common import (
    PooledBNStats,
    bn_names,
    configure_bn_training,
    frozen_running_stats,
    restart_running_stats,
)
from terradapt.metrics import pixel_entropy
from terradapt.model import SegmentationModel


class SARConfig(AdapterConfig):
    """Config of SAR."""

    lr: float = Field(default=1e-3, gt=0)
    entropy_margin: float = Field(default=0.4, gt=0, le=1, description="reliable if entropy < margin x ln K")
    rho: float = Field(default=0.05, gt=0, description="SAM neighbourhood radius")
    reset_loss: float = Field(default=0.02, ge=0, description="recover to source when the loss EMA falls below")
    ema: float = Field(default=0.9, ge=0, lt=1)


class SAR(Adapter):
    """Reliable-pixel entropy minimisation with a sharpness-aware step and recovery on collapse."""

    name = "sar"
    config_class = SARConfig
    config: SARConfig

    def configure(self, model: SegmentationModel) -> None:
        self.params = configure_bn_training(model)
        self.pooled = PooledBNStats(model, replaces=getattr(self, "pooled", None))
        self.optimizer = torch.optim.SGD(self.params, lr=self.config.lr, momentum=0.9)
        self._fresh = True
        self.loss_ema: float | None = None
        self.recoveries = getattr(self, "recoveries", 0)

    def changed_names(self) -> set[str]:
        return bn_names(self.model)

    def _reliable_loss(self, batch: torch.Tensor, margin: float) -> torch.Tensor | None:
        ent = pixel_entropy(self.model(batch))
        keep = ent < margin
        return ent[keep].mean() if bool(keep.any()) else None

    def adapt_step(self, batch: torch.Tensor) -> None:
        self._step(batch)
        self.pooled.write()  # after backward: autograd saved the running-stat tensors of this step

    def _step(self, batch: torch.Tensor) -> None:
        self.model.train()
        if self._fresh:
            restart_running_stats(self.model)
            self._fresh = False
        margin = self.config.entropy_margin * math.log(self.model.config.num_classes)
        loss = self._reliable_loss(batch, margin)
        if loss is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = torch.norm(torch.stack([g.norm() for g in grads])).clamp_min(1e-12)
        eps = [self.config.rho * g / norm for g in grads]
        with torch.no_grad():  # climb to the sharpest nearby point ...
            for p, e in zip(self.params, eps, strict=True):
                p.add_(e)
        self.optimizer.zero_grad(set_to_none=True)
        with frozen_running_stats(self.model):  # the perturbed pass must not enter the target statistics
            second = self._reliable_loss(batch, margin)
        if second is not None:
            second.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():  # ... and step from the original point with the gradient found there
            for p, e in zip(self.params, eps, strict=True):
                p.sub_(e)
        if second is not None:
            self.optimizer.step()
        value = float(loss.detach())
        self.loss_ema = (
            value if self.loss_ema is None else self.config.ema * self.loss_ema + (1 - self.config.ema) * value
        )
        if self.loss_ema < self.config.reset_loss:
            self.recoveries += 1
            self.reset()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(loss_ema=self.loss_ema, fresh=self._fresh, recoveries=self.recoveries)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.loss_ema, self._fresh, self.recoveries = state["loss_ema"], bool(state["fresh"]), int(state["recoveries"])
