"""Shared base of the adaptation methods that train BatchNorm affine parameters with pooled statistics."""

from __future__ import annotations

from abc import abstractmethod

import torch

from adapters.base import Adapter
from adapters.common import PooledBNStats, bn_names, restart_running_stats


class PooledBNAdapter(Adapter):
    """Base of the methods that train BatchNorm affine parameters with pooled target statistics.

    Subclasses set ``self.pooled`` and ``self._fresh = True`` in ``configure`` and implement ``_step`` (their
    loss and optimiser step). The first target batch replaces the source running statistics; the pooled
    statistics are written back after each step, once autograd no longer needs this step's tensors.
    """

    pooled: PooledBNStats
    _fresh: bool

    def changed_names(self) -> set[str]:
        return bn_names(self.model)

    def adapt_step(self, batch: torch.Tensor) -> None:
        self.model.train()
        if self._fresh:
            restart_running_stats(self.model)
            self._fresh = False
        self._step(batch)
        self.pooled.write()

    @abstractmethod
    def _step(self, batch: torch.Tensor) -> None:
        """One optimisation step of the method on a target batch (model already in train mode)."""
