"""Deployers: make a registry version the one a region serves, and undo it.

The in-process deployer is the embedded mode's (and the interface the TorchServe rollout implements): promotion
is the registry alias moving to the new version, rollback is the alias moving back to the previous one. The
source weights are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from adapters.buffer import BufferedTile
from adapters.gate import GateContext
from serving.registry import ModelRegistry
from terradapt.records import RolloutEvent, RolloutStep


@dataclass(frozen=True)
class RolloutContext:
    """What a deployer may check a version against: the job's tiles and the gate's context.

    Built once per job by the pipeline from the adaptation outcome, so a deployer that shadow-tests (TorchServe)
    judges the served outputs with exactly the inputs the in-process gate had: the same tiles (with their masks
    when labelled), the label-shift estimate, the source prior and the covariate flag.
    """

    tiles: Sequence[BufferedTile] = ()
    gate: GateContext = field(default_factory=GateContext)


class Deployer(Protocol):
    """Roll a region forward to a version, or back to its previous one."""

    def rollout(self, region: str, version: int, context: RolloutContext | None = None) -> RolloutEvent:
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

    def rollout(self, region: str, version: int, context: RolloutContext | None = None) -> RolloutEvent:
        """Promote: the in-process gate already judged the candidate before it was published."""
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
