"""When a drift alarm becomes an adaptation job: covariate shift only, per-region cooldown and budget.

Why not adapt on every alarm: under pure label shift (only the predicted class mix moved), re-estimating
normalisation statistics pulls predictions back toward the source class mix and costs 13-20 mIoU
(shared/FINDINGS.md). That guard protects the *source* model. A region already on an adapted version is
different: any alarm means its data left what the version was adapted to, and the current model's own
radiometry signal is no longer a clean covariate test (its predicted classes may be wrong), so every alarm there
becomes a job, and the job decides with the source model whether to re-adapt or go back to the source weights
(``stream.pipeline.Pipeline.adapt``). Cooldown stops a region from being adapted again before its new version
has seen data; the budget caps versions per region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from terradapt.settings import StrictModel


class TriggerConfig(StrictModel):
    """Trigger policy."""

    min_tiles: int = Field(default=16, ge=1, description="recent tiles needed before a job is issued")
    cooldown_tiles: int = Field(default=50, ge=0, description="tiles of the region between two jobs")
    max_versions: int = Field(default=5, ge=1, description="adapted versions per region")
    adapt_on_label_shift: bool = False


@dataclass(frozen=True)
class TriggerDecision:
    """Whether to adapt now, and why (kept in logs and drift events)."""

    adapt: bool
    reason: str


@dataclass
class TriggerState:
    """One region's trigger counters: tiles since its last job, jobs issued (part of the region's state)."""

    since_job: int = 10**9
    jobs: int = 0

    def to_dict(self) -> dict[str, int]:
        """Serialisable form."""
        return {"since_job": self.since_job, "jobs": self.jobs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TriggerState:
        """Inverse of ``to_dict``."""
        return cls(since_job=int(d["since_job"]), jobs=int(d["jobs"]))


class Trigger:
    """The trigger policy; the per-region counters live in a ``TriggerState`` the runner stores."""

    def __init__(self, config: TriggerConfig | None = None) -> None:
        self.config = config or TriggerConfig()

    @staticmethod
    def observe(state: TriggerState) -> None:
        """Count one more tile of the region."""
        state.since_job += 1

    def decide(
        self, state: TriggerState, *, drifted: bool, covariate: bool, buffered: int, adapted: bool = False
    ) -> TriggerDecision:
        """Decide for a region whose monitor just updated (``adapted``: it serves an adapted version)."""
        cfg = self.config
        if not drifted:
            return TriggerDecision(False, "no drift")
        if not covariate and not cfg.adapt_on_label_shift and not adapted:
            return TriggerDecision(False, "label shift only: adaptation would pull predictions to the source mix")
        if buffered < cfg.min_tiles:
            return TriggerDecision(False, f"waiting for tiles: {buffered}/{cfg.min_tiles}")
        if state.since_job < cfg.cooldown_tiles:
            return TriggerDecision(False, "cooldown")
        if state.jobs >= cfg.max_versions:
            return TriggerDecision(False, f"budget spent: {cfg.max_versions} versions")
        state.since_job = 0
        state.jobs += 1
        return TriggerDecision(True, "covariate drift" if covariate else "drift on an adapted version")
