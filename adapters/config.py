"""Adaptation settings: which method adapts (by default and per region), on how much data, the gate, the reset.

Validated at start: an unknown method, or a method config its method does not accept, is an error naming what is
accepted, not a failure at the first job.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from adapters.fewshot import FewShotConfig
from adapters.gate import GateConfig
from adapters.registry import adapter_class, available_adapters
from terradapt.settings import StrictModel


def _known_method(method: str, method_config: dict[str, Any] | None = None) -> str:
    """Reject an unknown method, or a method config its method does not accept, at start (not at the first job)."""
    if method not in available_adapters():
        raise ValueError(f"method={method!r}; accepted: {', '.join(available_adapters())}")
    adapter_class(method).config_class.model_validate(method_config or {})
    return method


class ResetConfig(StrictModel):
    """Config of the in-job reset policy (``adapters.policy.ResetPolicy``)."""

    threshold: float = Field(default=0.15, ge=0, description="degradation signal above this counts as bad")
    patience: int = Field(default=4, ge=1, description="consecutive bad batches before a reset")
    period: int | None = Field(default=None, ge=1, description="also reset every this many batches")


class RegionMethod(StrictModel):
    """The method of one region when it differs from the default."""

    method: str
    method_config: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, _: Any) -> None:
        """Reject unknown methods (listing the valid ones) and method configs they do not accept."""
        _known_method(self.method, self.method_config)


class AdaptationConfig(StrictModel):
    """Which method adapts (by default, and per region), on how much data, and the gate it must pass."""

    method: str = "bn-balanced"
    method_config: dict[str, Any] = Field(default_factory=dict)
    per_region: dict[str, RegionMethod] = Field(
        default_factory=dict, description='e.g. {"D013": {"method": "tent"}}: overrides method and method_config'
    )
    batch_size: int = Field(default=4, ge=1)
    epochs: int = Field(default=1, ge=1, description="passes over the buffered tiles")
    device: str = "auto"
    gate: GateConfig = Field(default_factory=GateConfig)
    reset: ResetConfig | None = Field(
        default=None,
        description="reset the adapter to source inside a job on a sustained class-drift signal (None = off)",
    )
    few_shot: FewShotConfig = Field(default_factory=FewShotConfig)

    def model_post_init(self, _: Any) -> None:
        """Reject unknown methods (listing the valid ones) and method configs they do not accept."""
        _known_method(self.method, self.method_config)

    def methods(self) -> tuple[str, ...]:
        """Every method this config may adapt with (the default, then per-region ones): what selection calibrates."""
        return tuple(dict.fromkeys([self.method, *(m.method for m in self.per_region.values())]))

    def method_for(self, region: str) -> RegionMethod:
        """The method (and its config) a region adapts with."""
        return self.per_region.get(region) or RegionMethod(method=self.method, method_config=self.method_config)
