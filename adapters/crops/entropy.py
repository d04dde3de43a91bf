"""TENT for the crop model: entropy minimisation on the normalisation layers' scale and shift (Wang et al. 2021).

Why: a confident source model is usually a correct one, so lowering the prediction entropy of target parcels
moves the normalisation layers (BatchNorm1d of the PSE and decoder, LayerNorm around the attention) toward the
target domain while every other weight stays frozen. BatchNorm normalises with the current batch's statistics; the
PSE's layers see every pixel of every date of the batch, so even a few parcels give stable statistics (the
decoder's falls back to its running statistics on a batch of one). Running statistics are re-estimated along the
way (cumulative average), so the deployed eval-mode model uses target statistics too.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field
from torch import nn

from adapters.common import minimise_entropy
from adapters.crops.base import CropAdapter, CropAdapterConfig, batchnorm_names
from terradapt.crops.model import CropBatch, CropModel


class CropTentConfig(CropAdapterConfig):
    """Config of crop TENT."""

    lr: float = Field(default=1e-3, gt=0)
    steps: int = Field(default=1, ge=1, description="optimisation steps per batch")


class CropTent(CropAdapter):
    """Entropy minimisation on normalisation affines, BatchNorm with batch statistics."""

    name = "tent"
    config_class = CropTentConfig
    config: CropTentConfig

    def configure(self, model: CropModel) -> None:
        model.train()
        model.requires_grad_(False)
        params: list[nn.Parameter] = []
        for m in model.norm_layers():
            m.requires_grad_(True)
            params += list(m.parameters(recurse=False))
        self._fresh = True
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr)

    def changed_names(self) -> set[str]:
        affine = {
            f"{name}.{p}"
            for name, m in self.model.named_modules()
            if m in self.model.norm_layers()
            for p, _ in m.named_parameters(recurse=False)
        }
        return affine | batchnorm_names(self.model)

    def adapt_step(self, batch: CropBatch) -> None:
        self.model.train()
        if self._fresh:
            # running statistics become the cumulative average of the target batches (momentum None, counter
            # zeroed); the source values stay until a layer sees a batch, so a one-row layer keeps them
            for m in self.model.batchnorm_layers():
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.zero_()
                m.momentum = None
            self._fresh = False
        minimise_entropy(self.model, batch, self.optimizer, self.config.steps)

    def extra_state(self) -> dict[str, Any]:
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "fresh": self._fresh}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._fresh = bool(state["fresh"])
        if not self._fresh:  # the running statistics are a cumulative average already under way
            for m in self.model.batchnorm_layers():
                m.momentum = None
