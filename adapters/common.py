"""Pieces shared by the gradient-based adapters: which tensors they touch, entropy, flips, source replay.

Why a shared module: every entropy/pseudo-label method here trains the same small, hard-to-wreck parameter set
(BatchNorm scale/shift) with BatchNorm in batch-statistics mode, and declaring exactly that set in
``changed_names`` is what the contract test checks. Keeping it in one place keeps the methods ~100 lines each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from terradapt.errors import TerradaptError
from terradapt.metrics import pixel_entropy
from terradapt.model import NORM_TYPES, SegmentationModel, norm_layers

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")

B = TypeVar("B")


class MethodNotApplicableError(TerradaptError, ValueError):
    """The method needs a layer type the model does not have (BatchNorm re-estimation on a GroupNorm model)."""

    reason = "method_not_applicable"


class MissingSourceTilesError(TerradaptError, ValueError):
    """A method that replays source tiles was built without any."""

    reason = "missing_source_tiles"


def bn_names(model: nn.Module, *, affine: bool = True) -> set[str]:
    """``state_dict`` names of every BatchNorm's statistics and (``affine``) every normalisation layer's scale/shift.

    The affine set is what ``configure_bn_training`` trains: BatchNorm, GroupNorm and LayerNorm parameters.
    """
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            names |= {f"{mod_name}.{s}" for s in BN_STATS}
        if affine and isinstance(mod, NORM_TYPES):
            names |= {f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False)}
    return names


def configure_bn_training(model: nn.Module) -> list[nn.Parameter]:
    """Train mode, gradients only on normalisation scale/shift, BatchNorm running stats as a cumulative average.

    Returns the trainable parameters: the affine parameters of every BatchNorm, GroupNorm and LayerNorm (models
    without BatchNorm still adapt through their GroupNorm/LayerNorm affines). Batch statistics over all pixels of
    even one 64 px tile are stable enough for segmentation, which is why batch size 1 works here where it fails for
    classification.
    """
    model.train()
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in norm_layers(model):
        m.requires_grad_(True)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
        params += list(m.parameters(recurse=False))
    return params


def restart_running_stats(model: nn.Module) -> None:
    """Forget the source running statistics (called on the first target batch)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Forward source tiles with their own batch statistics without letting them into the target running stats.

    The buffers are detached for the duration (BatchNorm then normalises with batch statistics and updates
    nothing), not copied back afterwards: autograd saved them for the target pass, so they must stay untouched.
    """
    stash: list[tuple[nn.BatchNorm2d, tuple[torch.Tensor | None, ...]]] = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            stash.append((m, (m.running_mean, m.running_var, m.num_batches_tracked)))
            m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, (mean, var, count) in stash:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


def minimise_entropy(
    model: Callable[[B], torch.Tensor], batch: B, optimizer: torch.optim.Optimizer, steps: int
) -> None:
    """``steps`` optimiser steps on the mean prediction entropy of ``batch`` (per pixel, or per parcel for crops).

    The entropy is taken over dim 1 (classes) of the model's logits, so tiles (N, K, H, W) and parcels (N, K)
    go through the same loss: the TENT objective of both tasks.
    """
    for _ in range(steps):
        loss = pixel_entropy(model(batch)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def flip_averaged_probs(model: SegmentationModel, batch: torch.Tensor) -> torch.Tensor:
    """Softmax averaged over identity, horizontal and vertical flips (each flipped back): stabler pseudo-labels."""
    probs = model(batch).softmax(dim=1)
    for dim in (-1, -2):
        probs = probs + model(batch.flip(dim)).softmax(dim=1).flip(dim)
    averaged: torch.Tensor = probs / 3
    return averaged


class SourceReplay:
    """Draws seeded batches of source tiles for methods that align target features with source features."""

    def __init__(self, tiles: torch.Tensor, method: str, seed: int = 0) -> None:
        if tiles.ndim != 4 or tiles.shape[0] == 0:
            raise MissingSourceTilesError(
                f"method {method!r}: source_tiles must be (N, C, H, W), N >= 1, got {tuple(tiles.shape)}"
            )
        self.tiles = tiles.float()
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` source tiles drawn with replacement."""
        idx = torch.randint(0, self.tiles.shape[0], (n,), generator=self.generator)
        return self.tiles[idx].to(device)


class PooledBNStats:
    """Running statistics pooled over every target pixel seen, written into each BatchNorm after a step.

    Why: with ``momentum=None`` BatchNorm averages the per-*batch* variances, which misses the variance *between*
    batches; with batches of one tile that is all the between-tile variation, so the deployed (eval-mode) model
    normalises with too small a variance. Summing x and x^2 over all pixels (float64) gives the pooled variance
    (law of total variance) whatever the batch size. Forwards through ``frozen_running_stats`` are skipped.
    """

    def __init__(self, model: nn.Module, replaces: PooledBNStats | None = None) -> None:
        if replaces is not None:  # a reset re-configures the same model: drop the previous hooks
            replaces.remove()
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not module.training or getattr(module, "running_mean", None) is None:
            return
        x = args[0].detach().double()
        s1, s2 = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        n = x.numel() // x.shape[1]
        p1, p2, pn = self.sums.get(id(module), (torch.zeros_like(s1), torch.zeros_like(s2), 0))
        self.sums[id(module)] = (p1 + s1, p2 + s2, pn + n)

    @torch.no_grad()
    def write(self) -> None:
        """Set every BatchNorm's running mean/var to the pooled target statistics seen so far."""
        for m in self.layers:
            if id(m) not in self.sums or m.running_mean is None or m.running_var is None:
                continue
            s1, s2, n = self.sums[id(m)]
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))

    def remove(self) -> None:
        """Detach the hooks (before a reset re-attaches fresh ones)."""
        for h in self.handles:
            h.remove()
