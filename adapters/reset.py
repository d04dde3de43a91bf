"""Reset policy for long streams: back to the source weights on a sustained degradation signal, or periodically.

Why: every method here adapts from its own predictions, so on a stream that never ends errors can compound
(FINDINGS.md: adaptation under label shift costs 13-20 mIoU), and a region's shift can change (season, a new
sensor) after which the adapted state is worse than a fresh start. The source weights are always kept, so a
reset is cheap and safe. The policy watches a label-free *degradation signal* per batch (higher is worse; the
default ``class_drift`` is how much farther the adapted model's predicted class mix is from a reference mix -
the source prior or the label-shift estimate - than the source model's, which collapse raises) and resets when the
signal stays above ``threshold`` for ``patience`` consecutive batches, or every ``period`` batches when set.
Windows are bounded and the state round-trips, like the drift detectors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field

from adapters.base import Adapter
from terradapt.model import UNet
from terradapt.settings import StrictModel


class ResetConfig(StrictModel):
    """Config of the reset policy."""

    threshold: float = Field(default=0.15, ge=0, description="degradation signal above this counts as bad")
    patience: int = Field(default=4, ge=1, description="consecutive bad batches before a reset")
    period: int | None = Field(default=None, ge=1, description="also reset every this many batches")


def _shares(model: UNet, batch: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    counts = torch.bincount(model(batch).argmax(dim=1).flatten(), minlength=model.config.num_classes).float()
    model.train(was_training)
    return counts / counts.sum()


@torch.no_grad()
def class_drift(adapted: UNet, source: UNet, batch: torch.Tensor, reference: torch.Tensor) -> float:
    """How much farther (total variation) the adapted model's class mix is from ``reference`` than the source's.

    Positive when adaptation moved the predictions *away* from the expected mix (collapse onto a few classes),
    zero or negative when it moved them toward it (a repaired covariate shift). Blind to the harm of pulling
    predictions toward the reference under genuine label shift: the gate's labelled check covers that.
    """
    ref = reference.to(batch.device)
    tv_adapted = 0.5 * (_shares(adapted, batch) - ref).abs().sum()
    tv_source = 0.5 * (_shares(source, batch) - ref).abs().sum()
    return float(tv_adapted - tv_source)


class ResetPolicy:
    """Decides after each batch whether the adapter goes back to source."""

    def __init__(self, config: ResetConfig | None = None) -> None:
        self.config = config or ResetConfig()
        self.recent: deque[float] = deque(maxlen=self.config.patience)
        self.steps = 0
        self.resets = 0

    def update(self, signal: float) -> bool:
        """Record one batch's degradation signal; True when the adapter should be reset now."""
        self.steps += 1
        self.recent.append(signal)
        sustained = len(self.recent) == self.config.patience and min(self.recent) > self.config.threshold
        periodic = self.config.period is not None and self.steps % self.config.period == 0
        if sustained or periodic:
            self.resets += 1
            self.recent.clear()
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Windows and counters."""
        return {"recent": list(self.recent), "steps": self.steps, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        self.recent = deque(state["recent"], maxlen=self.config.patience)
        self.steps, self.resets = int(state["steps"]), int(state["resets"])


def adapt_with_resets(
    adapter: Adapter, batches: Iterable[torch.Tensor], policy: ResetPolicy, source: UNet, reference: torch.Tensor
) -> UNet:
    """``adapter.adapt`` with the policy consulted after every batch (signal: ``class_drift``)."""
    device = next(adapter.model.parameters()).device
    source = source.to(device)
    for batch in batches:
        batch = batch.to(device)
        adapter.adapt_step(batch)
        if policy.update(class_drift(adapter.model, source, batch, reference)):
            adapter.reset()
    adapter.model.eval()
    return adapter.model
