"""Registry of adaptation methods: an explicit name -> class mapping (no import-order side effects)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from adapters.adda import ADDA
from adapters.base import Adapter
from adapters.bn import BNAdapt
from adapters.bn_balanced import BalancedBN
from adapters.coral import DeepCoral
from adapters.cotta import CoTTA
from adapters.dann import DANN
from adapters.eata import EATA
from adapters.prior_em import PriorEM
from adapters.sar import SAR
from adapters.self_training import SelfTraining
from adapters.tent import Tent
from terradapt.errors import UnknownNameError
from terradapt.model import SegmentationModel

_ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls for cls in (BNAdapt, BalancedBN, PriorEM, Tent, EATA, SAR, CoTTA, SelfTraining, DeepCoral, DANN, ADDA)
}


def available_adapters() -> list[str]:
    """Names of the registered methods (feeds config validation and ``terradapt adapt --method``)."""
    return sorted(_ADAPTERS)


def adapter_class(name: str) -> type[Adapter]:
    """The class of a registered method; an unknown name lists the valid ones."""
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise UnknownNameError("adaptation method", name, available_adapters()) from None


def create_adapter(
    name: str,
    model: SegmentationModel,
    config: dict[str, Any] | BaseModel | None = None,
    *,
    source_tiles: torch.Tensor | None = None,
    class_prior: torch.Tensor | None = None,
) -> Adapter:
    """Build a registered method on a model with its own config (validated, unknown keys rejected).

    Args:
        name: a registered method (``available_adapters()``).
        model: the model to adapt (copied, never modified).
        config: the method's own config, as a dict or a config model.
        source_tiles: raw source tiles (N, C, H, W) for methods that replay them (``source_replay`` is
            "optional" or "required"); ignored by the others.
        class_prior: the source class mix (K,), for the label-shift-aware methods (uniform when None).

    Returns:
        The adapter.

    Raises:
        UnknownNameError: the method is not registered.
        MissingSourceTilesError: the method requires source tiles and none were given.

    """
    cls = adapter_class(name)
    if isinstance(config, BaseModel):
        config = config.model_dump()
    validated = cls.config_class.model_validate(config or {})
    replay = source_tiles if cls.source_replay != "none" else None
    return cls(model, validated, source_tiles=replay, class_prior=class_prior)
