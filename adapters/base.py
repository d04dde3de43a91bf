"""The adapter contract and the registry of adaptation methods.

An adapter owns a *copy* of the model it adapts (the source snapshot is kept for ``reset``), declares which
parameters and buffers it changes, and turns a stream of target batches into an adapted model. Batches are raw
tiles (N, C, H, W) float tensors; segmentation and classification differ only in the loss, which each method
computes per pixel.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch

from adapters.common import MethodNotApplicableError, MissingSourceTilesError
from terradapt.model import SegmentationModel, bn_layers
from terradapt.settings import StrictModel


class AdapterConfig(StrictModel):
    """Base of every method's own config."""

    device: str = "auto"


class Adapter(ABC):
    """Configure the model, collect what to adapt, ``adapt`` on target batches, ``reset`` to source."""

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: Whether the method replays source tiles: such methods take ``source_tiles=`` (keyword) in their
    #: constructor, and ``create_adapter(..., source_tiles=...)`` passes it on; "required" ones refuse to start
    #: without it. Tiles are data, not configuration, so they never go through the (serialisable) config.
    source_replay: ClassVar[Literal["none", "optional", "required"]] = "none"
    #: Whether the method only acts on BatchNorm statistics (re-estimation): it refuses a model without any
    #: (GroupNorm/LayerNorm networks adapt with the entropy methods, which train those layers' affines).
    needs_batchnorm: ClassVar[bool] = False

    def __init__(
        self,
        model: SegmentationModel,
        config: AdapterConfig | None = None,
        *,
        source_tiles: torch.Tensor | None = None,
        class_prior: torch.Tensor | None = None,
    ) -> None:
        if source_tiles is not None and self.source_replay == "none":
            raise ValueError(f"method {self.name!r} does not replay source tiles; source_tiles must be None")
        if source_tiles is None and self.source_replay == "required":
            raise MissingSourceTilesError(
                f"method {self.name!r} replays source tiles: pass source_tiles=(N, C, H, W) tensor, N >= 1"
            )
        if self.needs_batchnorm and not bn_layers(model):
            raise MethodNotApplicableError(
                f"method {self.name!r} re-estimates BatchNorm statistics and the model has no BatchNorm layer; "
                "use an entropy method (tent, eata, sar), which trains GroupNorm/LayerNorm affines"
            )
        self.source_tiles = source_tiles
        k = model.config.num_classes
        #: the source class mix (``ModelManifest.class_prior``; uniform when unknown): data, like source tiles
        self.class_prior = (
            torch.full((k,), 1.0 / k) if class_prior is None else (class_prior / class_prior.sum()).float().cpu()
        )
        self.config = config or self.config_class()
        self.source_state = copy.deepcopy(model.state_dict())
        self.model = copy.deepcopy(model)
        self.configure(self.model)

    @abstractmethod
    def configure(self, model: SegmentationModel) -> None:
        """Put the model in the mode the method needs (which layers train, which use batch statistics)."""

    @abstractmethod
    def changed_names(self) -> set[str]:
        """Names in ``state_dict()`` that this method may change (everything else must stay bit-identical)."""

    @abstractmethod
    def adapt_step(self, batch: torch.Tensor) -> None:
        """Adapt on one batch of target tiles."""

    def adapt(self, batches: Iterable[torch.Tensor]) -> SegmentationModel:
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
