"""Pieces shared by the gradient-based adapters: which tensors they touch, entropy, flips, source replay.

Why a shared module: every entropy/pseudo-label method here trains the same small, hard-to-wreck parameter set
(BatchNorm scale/shift) with BatchNorm in batch-statistics mode, and declaring exactly that set in
``changed_names`` is what the contract test checks. Keeping it in one place keeps the methods ~100 lines each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from terradapt.errors import TerradaptError
from terradapt.model import UNet

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


class MissingSourceTilesError(TerradaptError, ValueError):
    """A method that replays source tiles was built without any."""

    reason = "missing_source_tiles"


def bn_names(model: nn.Module, *, affine: bool = True) -> set[str]:
    """``state_dict`` names of every BatchNorm's statistics (and its scale/shift when ``affine``)."""
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            names |= {f"{mod_name}.{s}" for s in BN_STATS}
            if affine:
                names |= {f"{mod_name}.weight", f"{mod_name}.bias"}
    return names


def configure_bn_training(model: nn.Module) -> list[nn.Parameter]:
    """Train mode, gradients only on BatchNorm scale/shift, running stats as a cumulative target average.

    Returns the trainable parameters. Batch statistics over all pixels of even one 64 px tile are stable enough
    for segmentation, which is why batch size 1 works here where it fails for classification.
    """
    model.train()
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.momentum = None
            params += [p for p in (m.weight, m.bias) if p is not None]
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


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy (N, H, W) of logits (N, K, H, W)."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def flip_averaged_probs(model: UNet, batch: torch.Tensor) -> torch.Tensor:
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
