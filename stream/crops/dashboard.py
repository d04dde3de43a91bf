"""The crop loop's run as the dashboard's state file: per region (country) drift timeline, versions, gate verdicts.

The dashboard reads runs through structural protocols (``monitoring.dashboard.state.RunLike``); this view gives it
the crop loop's parcel logs as the timeline, its adaptations as model versions (a rejected candidate as a refused
version of its base) and its dead letters. Crop regions (``lv-1``, ``frh-1``) land on the dashboard's country map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from monitoring.dashboard import DashboardState, dashboard_state
from serving.crop_registry import CropRegistry
from stream.crops.runner import CropRunResult, ParcelLog
from terradapt.records import DeadLetter, ModelVersion, RolloutEvent

__all__ = ["CountryShift", "crop_dashboard_state"]


@dataclass(frozen=True)
class CountryShift:
    """A target country's shift description (the page's "shift" column); no held-out mIoU for crops."""

    region: str
    shift: str
    miou_source: float | None = None
    miou_current: float | None = None


@dataclass
class _CropRunView:
    tiles: Sequence[ParcelLog]
    drift_events: Sequence[object]
    adaptations: Sequence[ModelVersion]
    dead_letters: Sequence[DeadLetter]
    first_detection: dict[str, int]
    rollouts: Sequence[RolloutEvent] = ()
    confusion: dict[tuple[str, int], npt.NDArray[np.int64]] = field(default_factory=dict)


def crop_dashboard_state(
    run: CropRunResult,
    logs: Sequence[ParcelLog],
    registry: CropRegistry,
    *,
    shifts: Sequence[CountryShift] = (),
    title: str = "terradapt - crop mapping",
) -> DashboardState:
    """The dashboard state of a crop run (``logs``: every ``ParcelLog`` the loop's ``on_parcel`` received)."""
    versions = [
        a.version
        if a.version is not None
        else ModelVersion(
            region=a.region,
            version=a.base_version,
            parent=a.base_version,
            method=a.method,
            sha256="",
            href="",
            accepted=False,
            gate_reasons=a.reasons,
            job_id=a.job_id,
        )
        for a in run.adaptations
    ]
    view = _CropRunView(logs, run.drift_events, versions, run.dead_letters, run.first_detection)
    return dashboard_state(view, registry, rows=shifts, title=title)
