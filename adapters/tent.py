"""TENT: test-time entropy minimisation on BatchNorm affine parameters (Wang et al., ICLR 2021).

Why: a confident source model is usually a correct one, so lowering per-pixel prediction entropy on target tiles
nudges the normalisation layers toward the target domain. Only BatchNorm scale/shift are trained (a few
thousand parameters, hard to wreck) and BatchNorm normalises with the statistics of the current batch, which
for segmentation are estimated over every pixel, so even a batch of one tile gives stable statistics. The
running statistics are re-estimated along the way (cumulative average) so the deployed eval-mode model uses
target statistics too.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from adapters.base import Adapter, AdapterConfig
from terradapt.metrics import pixel_entropy
from terradapt.model import UNet


class TentConfig(AdapterConfig):
    """Config of TENT."""

    lr: float = Field(default=1e-3, gt=0)
    steps: int = Field(default=1, ge=1, description="optimisation steps per batch")


class Tent(Adapter):
    """Entropy minimisation on BatchNorm affine parameters with batch statistics."""

    name = "tent"
    config_class = TentConfig
    config: TentConfig

    def configure(self, model: UNet) -> None:
        model.train()
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(True)
                m.momentum = None  # running stats = cumulative average over the adaptation stream
        self._fresh = True  # source running stats are replaced on the first target batch
        self.optimizer = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=self.config.lr, betas=(0.9, 0.999)
        )

    def changed_names(self) -> set[str]:
        names = set()
        for mod_name, mod in self.model.named_modules():
            if isinstance(mod, nn.BatchNorm2d):
                names |= {f"{mod_name}.{s}" for s in ("weight", "bias", "running_mean", "running_var")}
                names.add(f"{mod_name}.num_batches_tracked")
        return names

    def adapt_step(self, batch: torch.Tensor) -> None:
        self.model.train()
        if self._fresh:
            for m in self.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
            self._fresh = False
        for _ in range(self.config.steps):
            loss = pixel_entropy(self.model(batch)).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
