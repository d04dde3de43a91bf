"""Registry of adaptation methods: an explicit name -> class mapping (no import-order side effects)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from adapters.base import Adapter
from adapters.bn import BNAdapt
from adapters.tent import Tent
from terradapt.errors import UnknownNameError
from terradapt.model import UNet

_ADAPTERS: dict[str, type[Adapter]] = {cls.name: cls for cls in (BNAdapt, Tent)}


def available_adapters() -> list[str]:
    """Names of the registered methods (feeds config validation and ``terradapt adapt --method``)."""
    return sorted(_ADAPTERS)


def adapter_class(name: str) -> type[Adapter]:
    """The class of a registered method; an unknown name lists the valid ones."""
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise UnknownNameError("adaptation method", name, available_adapters()) from None


def create_adapter(name: str, model: UNet, config: dict[str, Any] | BaseModel | None = None) -> Adapter:
    """Build a registered method on a model with its own config (validated, unknown keys rejected)."""
    cls = adapter_class(name)
    if isinstance(config, BaseModel):
        config = config.model_dump()
    return cls(model, cls.config_class.model_validate(config or {}))
