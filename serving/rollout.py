"""Deployers: make a registry version the one a region serves, and undo it.

The in-process deployer is the embedded mode's (and the interface the TorchServe rollout implements): promotion
is the registry alias moving to the new version, rollback is the alias moving back to the previous one. The
source weights are never touched.
"""

from __future__ import annotations

from typing import Protocol

from serving.registry import ModelRegistry
from terradapt.records import RolloutEvent, RolloutStep


class Deployer(Protocol):
    """Roll a region forward to a version, or back to its previous one."""

    def rollout(self, region: str, version: int) -> RolloutEvent:
        """Make ``version`` the region's default; the returned event says whether it was promoted."""
        ...

    def rollback(self, region: str) -> RolloutEvent:
        """Serve the region's previous version again."""
        ...


class InProcessDeployer:
    """Promotion = registry alias update; the in-process predictor reads the alias on every call."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.events: list[RolloutEvent] = []

    def _event(self, event: RolloutEvent) -> RolloutEvent:
        self.events.append(event)
        return event

    def rollout(self, region: str, version: int) -> RolloutEvent:
        previous = self.registry.current(region)
        self.registry.set_current(region, version)
        return self._event(RolloutEvent(region=region, version=version, step=RolloutStep.PROMOTED, previous=previous))

    def rollback(self, region: str) -> RolloutEvent:
        current = self.registry.current(region)
        previous = self.registry.previous(region)
        target = 0 if previous is None else previous
        self.registry.set_current(region, target)
        return self._event(
            RolloutEvent(
                region=region,
                version=target,
                step=RolloutStep.ROLLED_BACK,
                previous=current,
                detail="rollback",
            )
        )
