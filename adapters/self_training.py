"""Class-balanced pseudo-label self-training (after CBST, Zou et al., ECCV 2018), for segmentation.

Why: plain self-training keeps the pixels above one global confidence threshold, and in land cover those are
mostly the easy majority classes (herbaceous, agricultural): the model drifts toward predicting them everywhere,
the same failure as entropy minimisation under label shift. Choosing the threshold *per predicted class* -
the ``keep_fraction`` most confident pixels of each class in the batch - keeps every class represented in the
targets. Pseudo-labels come from flip-averaged predictions of the model in eval mode with its current
statistics; the loss is the cross-entropy of the model in batch-statistics mode on those labels. Only BatchNorm
scale/shift train (and its statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch.nn import functional as F  # noqa: N812

from adapters.base import AdapterConfig
from adapters.common import (
    PooledBNStats,
    configure_bn_training,
    flip_averaged_probs,
)
from adapters.pooled import PooledBNAdapter
from terradapt.model import SegmentationModel

IGNORE = -1


class SelfTrainingConfig(AdapterConfig):
    """Config of class-balanced self-training."""

    lr: float = Field(default=1e-3, gt=0)
    keep_fraction: float = Field(default=0.5, gt=0, le=1, description="most confident share kept per class")
    min_confidence: float = Field(default=0.5, ge=0, lt=1, description="never keep pixels below this")


def class_balanced_labels(probs: torch.Tensor, keep_fraction: float, min_confidence: float) -> torch.Tensor:
    """Pseudo-labels (N, H, W) from probabilities (N, K, H, W); pixels not kept are ``IGNORE``.

    Per predicted class, the threshold is the (1 - keep_fraction) quantile of that class's confidences.
    """
    conf, label = probs.max(dim=1)
    out = torch.full_like(label, IGNORE)
    for k in range(probs.shape[1]):
        sel = label == k
        if not bool(sel.any()):
            continue
        threshold = torch.quantile(conf[sel].float(), 1 - keep_fraction) if keep_fraction < 1 else conf.new_zeros(())
        keep = sel & (conf >= threshold) & (conf >= min_confidence)
        out[keep] = k
    return out


class SelfTraining(PooledBNAdapter):
    """Cross-entropy on class-balanced, flip-averaged pseudo-labels."""

    name = "self-training"
    config_class = SelfTrainingConfig
    config: SelfTrainingConfig

    def configure(self, model: SegmentationModel) -> None:
        self.optimizer = torch.optim.Adam(configure_bn_training(model), lr=self.config.lr)
        self.pooled = PooledBNStats(model, replaces=getattr(self, "pooled", None))
        self._fresh = True

    def _step(self, batch: torch.Tensor) -> None:
        logits = self.model(batch)  # batch statistics; also accumulates the target running statistics
        with torch.no_grad():
            self.model.eval()
            labels = class_balanced_labels(
                flip_averaged_probs(self.model, batch), self.config.keep_fraction, self.config.min_confidence
            )
            self.model.train()
        if not bool((labels != IGNORE).any()):
            return
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fresh"] = self._fresh
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fresh = bool(state["fresh"])
