"""Registry of crop adaptation methods: an explicit name -> class mapping, like ``adapters.registry``."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from adapters.crops.base import CropAdapter
from adapters.crops.entropy import CropTent
from adapters.crops.norm import CropBNAdapt
from adapters.crops.phenology import PhenologyBN, PhenologyShift
from terradapt.crops.model import CropModel
from terradapt.errors import UnknownNameError

_CROP_ADAPTERS: dict[str, type[CropAdapter]] = {
    cls.name: cls for cls in (CropBNAdapt, CropTent, PhenologyShift, PhenologyBN)
}


def available_crop_adapters() -> list[str]:
    """Names of the registered crop methods."""
    return sorted(_CROP_ADAPTERS)


def crop_adapter_class(name: str) -> type[CropAdapter]:
    """The class of a registered crop method; an unknown name lists the valid ones."""
    try:
        return _CROP_ADAPTERS[name]
    except KeyError:
        raise UnknownNameError("crop adaptation method", name, available_crop_adapters()) from None


def create_crop_adapter(
    name: str,
    model: CropModel,
    config: dict[str, Any] | BaseModel | None = None,
    *,
    class_prior: torch.Tensor | None = None,
) -> CropAdapter:
    """Build a registered crop method on a model with its own config (validated, unknown keys rejected).

    Raises:
        UnknownNameError: the method is not registered.
        pydantic.ValidationError: the config has an unknown key or a bad value.

    """
    cls = crop_adapter_class(name)
    if isinstance(config, BaseModel):
        config = config.model_dump()
    return cls(model, cls.config_class.model_validate(config or {}), class_prior=class_prior)
