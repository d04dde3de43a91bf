"""Class-balanced BatchNorm re-estimation: AdaBN whose statistics are re-weighted to the source class mix.

Why: plain re-estimation (``bn``) measures the target's activation statistics, and those mix two things: how the
classes *look* (what covariate shift changes and what adaptation should follow) and how *many* of each there are
(label shift). Under label shift alone the new statistics pull predictions back toward the source mix and cost
13-20 mIoU (shared/FINDINGS.md). Re-weighting every pixel by ``p_source(c) / q(c)``, with ``c`` its predicted
class and ``q`` the predicted class shares of the target tiles, makes the weighted pixels carry the source class
mix again: what remains in the statistics is the change of look. The class of a pixel comes from the model
itself, so the estimate is iterated (``iterations``): predict, re-estimate, predict again with the re-normalised
model (the first predictions of a badly shifted model are poor; the weights then fall back toward plain AdaBN,
clipped to ``[1 / max_weight, max_weight]``). This is the statistics part of DELTA's test-time batch
renormalisation and re-weighting (Zhao et al. 2023) and of RoTTA's category-balanced memory, for segmentation:
the pixel is the sample, its predicted class the category.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adapters.base import Adapter, AdapterConfig
from adapters.common import BN_STATS
from terradapt.model import SegmentationModel, bn_layers


class BalancedBNConfig(AdapterConfig):
    """Config of class-balanced BatchNorm re-estimation."""

    iterations: int = Field(default=2, ge=1, description="predict -> re-weight -> re-estimate rounds per batch")
    max_weight: float = Field(default=10.0, ge=1.0, description="pixel weights are clipped to [1/w, w]")


class _Sums:
    """Weighted sums of one BatchNorm layer's inputs over the batches seen: w, w*x, w*x^2 per channel."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.w = torch.zeros((), device=device, dtype=torch.float64)
        self.x = torch.zeros(channels, device=device, dtype=torch.float64)
        self.x2 = torch.zeros(channels, device=device, dtype=torch.float64)

    def add(self, x: torch.Tensor, w: torch.Tensor) -> None:
        xd, wd = x.double(), w.double()
        self.w += wd.sum()
        self.x += (xd * wd).sum(dim=(0, 2, 3))
        self.x2 += (xd * xd * wd).sum(dim=(0, 2, 3))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.w.clamp_min(1e-12)
        mean = self.x / n
        return mean, (self.x2 / n - mean * mean).clamp_min(0.0)


class BalancedBN(Adapter):
    """Re-estimate BatchNorm statistics on target tiles with pixels re-weighted to the source class mix."""

    name = "bn-balanced"
    needs_batchnorm = True
    config_class = BalancedBNConfig
    config: BalancedBNConfig

    def configure(self, model: SegmentationModel) -> None:
        model.eval()
        self._done: list[list[_Sums]] = []  # one list of per-layer sums per finished batch
        self._shares = torch.zeros(model.config.num_classes, dtype=torch.float64)

    def changed_names(self) -> set[str]:
        return {f"{n}.{s}" for n, m in self.model.named_modules() if isinstance(m, nn.BatchNorm2d) for s in BN_STATS}

    @torch.no_grad()
    def adapt_step(self, batch: torch.Tensor) -> None:
        layers = bn_layers(self.model)
        prior = self.class_prior.to(torch.float64)
        for _ in range(self.config.iterations):
            pred = self.model(batch).argmax(dim=1)  # (N, H, W) with the statistics estimated so far
            counts = torch.bincount(pred.flatten().cpu(), minlength=prior.numel()).double()
            shares = (self._shares + counts) / (self._shares + counts).sum()
            ratio = (prior / shares.clamp_min(1e-12)).clamp(1.0 / self.config.max_weight, self.config.max_weight)
            weights = ratio.to(batch.device).float()[pred].unsqueeze(1)  # (N, 1, H, W)
            sums = [_Sums(bn.num_features, batch.device) for bn in layers]
            with _weighted_batch_norm(layers, weights, sums):
                self.model(batch)
            self._write(layers, [*self._done, sums])
        self._done.append(sums)
        self._shares += counts

    @staticmethod
    def _write(layers: list[nn.BatchNorm2d], batches: list[list[_Sums]]) -> None:
        for i, bn in enumerate(layers):
            total = _Sums(bn.num_features, batches[0][i].x.device)
            for sums in batches:
                total.w += sums[i].w
                total.x += sums[i].x
                total.x2 += sums[i].x2
            mean, var = total.moments()
            if bn.running_mean is not None and bn.running_var is not None:
                bn.running_mean.copy_(mean.float())
                bn.running_var.copy_(var.float())


@contextmanager
def _weighted_batch_norm(layers: list[nn.BatchNorm2d], weights: torch.Tensor, sums: list[_Sums]) -> Iterator[None]:
    """Every BatchNorm layer normalises with the *weighted* statistics of its input, and records them.

    Each layer sees the pixel weights resized to its resolution (area average), so deeper layers are normalised
    by re-weighted statistics too, as AdaBN normalises every layer by the target's.
    """

    def make(bn: nn.BatchNorm2d, acc: _Sums) -> Callable[..., torch.Tensor]:
        def forward(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
            size = (int(x.shape[-2]), int(x.shape[-1]))
            w = F.adaptive_avg_pool2d(weights, size) if tuple(weights.shape[-2:]) != size else weights
            acc.add(x, w)
            n = w.sum().clamp_min(1e-12)
            mean = (x * w).sum(dim=(0, 2, 3)) / n
            var = (((x - mean.view(1, -1, 1, 1)) ** 2) * w).sum(dim=(0, 2, 3)) / n
            out = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + self.eps)
            if self.affine:
                out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
            return out

        return forward

    for bn, acc in zip(layers, sums, strict=True):
        bn.forward = types.MethodType(make(bn, acc), bn)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in layers:
            del bn.forward
