"""The adapter contract and the registry of adaptation methods.

An adapter owns a *copy* of the model it adapts (the source snapshot is kept for ``reset``), declares which
parameters and buffers it changes, and turns a stream of target batches into an adapted model. Batches are raw
tiles (N, C, H, W) float tensors; segmentation and classification differ only in the loss, which each method
computes per pixel. The source snapshot, ``adapt``, ``reset`` and the state round trip are
:class:`adapters.snapshot.SnapshotAdapter`, shared with the crop adapters.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from adapters.common import MethodNotApplicableError, MissingSourceTilesError
from adapters.snapshot import SnapshotAdapter, source_class_prior
from terradapt.model import SegmentationModel, bn_layers
from terradapt.settings import StrictModel


class AdapterConfig(StrictModel):
    """Base of every method's own config."""

    device: str = "auto"


class Adapter(SnapshotAdapter[SegmentationModel, torch.Tensor]):
    """Configure the model, collect what to adapt, ``adapt`` on target batches, ``reset`` to source."""

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
        #: the source class mix (``ModelManifest.class_prior``; uniform when unknown): data, like source tiles
        self.class_prior = source_class_prior(class_prior, model.config.num_classes)
        self.config = config or self.config_class()
        self._take_source(model)
