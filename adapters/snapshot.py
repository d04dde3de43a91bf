"""The task-independent half of the adapter contract: a copy of the source model, ``adapt``, ``reset``, state.

An adapter owns a *copy* of the model it adapts and keeps the source weights for ``reset``; what it may change,
how it configures the model and what one step does are the method's. Segmentation adapters
(:class:`adapters.base.Adapter`, batches of tiles) and crop adapters (:class:`adapters.crops.base.CropAdapter`,
batches of parcel series) share this one implementation and differ only in their model and batch types.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

import torch

__all__ = ["Movable", "SnapshotAdapter", "source_class_prior"]


class Movable(Protocol):
    """A batch that can be moved to the model's device."""

    def to(self, device: torch.device) -> Self: ...


ModelT = TypeVar("ModelT", bound=torch.nn.Module)
BatchT = TypeVar("BatchT", bound=Movable)


def source_class_prior(class_prior: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The source class mix as a float distribution on the CPU; uniform when unknown (``None``)."""
    if class_prior is None:
        return torch.full((num_classes,), 1.0 / num_classes)
    return (class_prior / class_prior.sum()).float().cpu()


class SnapshotAdapter(ABC, Generic[ModelT, BatchT]):
    """Configure the model, collect what to adapt, ``adapt`` on target batches, ``reset`` to source."""

    name: ClassVar[str]
    model: ModelT
    source_state: dict[str, Any]

    def _take_source(self, model: ModelT) -> None:
        """Keep the source weights and adapt a configured copy (the caller's model is never modified)."""
        self.source_state = copy.deepcopy(model.state_dict())
        self.model = copy.deepcopy(model)
        self.configure(self.model)

    @abstractmethod
    def configure(self, model: ModelT) -> None:
        """Put the model in the mode the method needs (which layers train, which use batch statistics)."""

    @abstractmethod
    def changed_names(self) -> set[str]:
        """Names in ``state_dict()`` that this method may change (everything else must stay bit-identical)."""

    @abstractmethod
    def adapt_step(self, batch: BatchT) -> None:
        """Adapt on one batch of target data."""

    def adapt(self, batches: Iterable[BatchT]) -> ModelT:
        """Adapt on every batch in order and return the adapted model in eval mode."""
        device = next(self.model.parameters()).device
        for batch in batches:
            self.adapt_step(batch.to(device))
        self.model.eval()
        return self.model

    def reset(self) -> None:
        """Back to the source weights exactly (the reset policy of long streams uses this)."""
        self.model.load_state_dict(self.source_state)
        self.configure(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Adapter state: the adapted model weights (method-specific state is added by subclasses)."""
        return {"model": {k: v.clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        self.model.load_state_dict(state["model"])
