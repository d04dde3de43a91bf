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

from adapters.base import Adapter, AdapterConfig
from adapters.common import bn_names, configure_bn_training, minimise_entropy, restart_running_stats
from terradapt.model import SegmentationModel


class TentConfig(AdapterConfig):
    """Config of TENT."""

    lr: float = Field(default=1e-3, gt=0)
    steps: int = Field(default=1, ge=1, description="optimisation steps per batch")


class Tent(Adapter):
    """Entropy minimisation on BatchNorm affine parameters with batch statistics."""

    name = "tent"
    config_class = TentConfig
    config: TentConfig

    def configure(self, model: SegmentationModel) -> None:
        # normalisation affines train (BatchNorm, GroupNorm, LayerNorm); BatchNorm running stats = cumulative
        # average over the adaptation stream
        params = configure_bn_training(model)
        self._fresh = True  # source running stats are replaced on the first target batch
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr, betas=(0.9, 0.999))

    def changed_names(self) -> set[str]:
        return bn_names(self.model)

    def adapt_step(self, batch: torch.Tensor) -> None:
        self.model.train()
        if self._fresh:
            restart_running_stats(self.model)
            self._fresh = False
        minimise_entropy(self.model, batch, self.optimizer, self.config.steps)
