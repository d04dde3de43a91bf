"""The crop adapter contract: a copy of the model, what it may change, ``adapt_step`` on target batches, ``reset``.

The source snapshot, ``adapt`` and ``reset`` are :class:`adapters.snapshot.SnapshotAdapter`, shared with the
segmentation adapters; a crop adapter adds its method state (``extra_state``) to the state round trip.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from adapters.snapshot import SnapshotAdapter, source_class_prior
from terradapt.crops.model import CropBatch, CropModel
from terradapt.settings import StrictModel


class CropAdapterConfig(StrictModel):
    """Base of every crop method's own config."""


class CropAdapter(SnapshotAdapter[CropModel, CropBatch]):
    """Configure the model, collect what to adapt, ``adapt`` on target batches, ``reset`` to source.

    Args:
        model: the source model (copied; never modified).
        config: the method's own config.
        class_prior: the source class mix (K,), uniform when unknown (data, like the manifest's ``class_prior``).

    """

    config_class: ClassVar[type[CropAdapterConfig]] = CropAdapterConfig

    def __init__(
        self, model: CropModel, config: CropAdapterConfig | None = None, *, class_prior: torch.Tensor | None = None
    ) -> None:
        self.class_prior = source_class_prior(class_prior, model.config.num_classes)
        self.config = config or self.config_class()
        self._take_source(model)

    def state_dict(self) -> dict[str, Any]:
        """The adapted weights plus the method's own state (``extra_state``)."""
        return {**super().state_dict(), "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        super().load_state_dict(state)
        self.load_extra_state(state["extra"])

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond the weights (accumulated statistics); none by default."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # no method state by default
        """Restore ``extra_state`` output."""


def batchnorm_names(model: CropModel) -> set[str]:
    """``state_dict`` names of every BatchNorm's running statistics."""
    return {
        f"{name}.{stat}"
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.BatchNorm1d)
        for stat in ("running_mean", "running_var", "num_batches_tracked")
    }
