"""Output prior correction (Saerens et al. 2002): re-weight the posteriors by the target class mix, found by EM.

Why: under label shift (p(x | y) unchanged, p(y) changed), the Bayes-optimal classifier for the target is the
source one with its posteriors multiplied by ``q(y) / p_source(y)``. ``q`` is unknown, but the EM fixed point of
the model's own soft predictions on the target pixels estimates it (MLLS, ``monitoring.label_shift.mlls``). The
correction is a constant per class added to the logits, so it is written into the head's bias: the version stays
an ordinary model (``log q - log p_source``, clipped to ``max_log_ratio``), and the method touches nothing else.
It assumes reasonably calibrated posteriors: under strong covariate shift they are not, which is why the gate
and the label-free selection judge every candidate.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from adapters.base import Adapter, AdapterConfig
from monitoring.label_shift import MLLSConfig, mlls
from terradapt.model import SegmentationModel


class PriorEMConfig(AdapterConfig):
    """Config of the EM prior correction."""

    pixels_per_tile: int = Field(default=2048, ge=16, description="pixels sampled per tile for EM (memory bound)")
    max_log_ratio: float = Field(default=3.0, gt=0.0, description="clip of |log q / p_source| per class")
    seed: int = 0


class PriorEM(Adapter):
    """Estimate the target class mix by EM on the model's posteriors; shift the head bias by log(q / p_source)."""

    name = "prior-em"
    config_class = PriorEMConfig
    config: PriorEMConfig

    def configure(self, model: SegmentationModel) -> None:
        model.eval()
        head = model.classifier()
        self._bias0 = head.bias.detach().clone() if head.bias is not None else None
        self._samples: list[np.ndarray] = []
        self._rng = torch.Generator().manual_seed(self.config.seed)

    def changed_names(self) -> set[str]:
        head = self.model.classifier()
        return {f"{name}.bias" for name, m in self.model.named_modules() if m is head}

    @torch.no_grad()
    def adapt_step(self, batch: torch.Tensor) -> None:
        head = self.model.classifier()
        if head.bias is None or self._bias0 is None:
            return
        head.bias.copy_(self._bias0)  # posteriors of the uncorrected model
        probs = self.model(batch).softmax(dim=1)  # (N, K, H, W)
        flat = probs.permute(0, 2, 3, 1).reshape(probs.shape[0], -1, probs.shape[1])
        for tile in flat:
            idx = torch.randperm(tile.shape[0], generator=self._rng)[: self.config.pixels_per_tile]
            self._samples.append(tile[idx.to(tile.device)].double().cpu().numpy())
        prior = self.class_prior.double().numpy()
        estimate = mlls(np.concatenate(self._samples), prior, MLLSConfig(max_iter=200))
        ratio = np.log(np.maximum(estimate.proportions, 1e-12)) - np.log(np.maximum(prior / prior.sum(), 1e-12))
        shift = torch.from_numpy(np.clip(ratio, -self.config.max_log_ratio, self.config.max_log_ratio))
        head.bias.copy_(self._bias0 + shift.to(head.bias.device, head.bias.dtype))
