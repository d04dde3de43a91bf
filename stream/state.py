"""One region's stream state: its monitor, its trigger counters, its recent tiles. One serialisation, every runner.

The embedded runner keeps the bytes in a dict, the faust worker in a changelog-backed table keyed by region (so
it survives restarts and rebalances, and moves with the partition). What is stored is small and bounded: the
monitor's *stream* state (windows, latches, re-baseline offsets; never the calibration, which every process
rebuilds from the calibration data with its own settings), two counters, and the ids and hrefs of the last
``buffer_tiles`` acquisitions (the tiles an adaptation job reads back from object storage).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.trigger import TriggerState
from monitoring.accuracy import DelayedLabelTracker
from monitoring.monitor import RegionMonitor
from stream.outcome import json_object

log = logging.getLogger(__name__)

STATE_FORMAT = 1

#: what restoring a stored state that is not one of ours raises (wrong JSON, wrong shapes, numbers out of range,
#: nesting too deep)
UNREADABLE_STATE = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError)


@dataclass(frozen=True)
class RecentTile:
    """A recent acquisition of a region: its id and where its object is stored."""

    acquisition_id: str
    href: str


@dataclass
class RegionState:
    """The per-region state the pipeline reads and returns for every acquisition."""

    monitor: RegionMonitor
    trigger: TriggerState = field(default_factory=TriggerState)
    recent: deque[RecentTile] = field(default_factory=deque)

    def seen(self, acquisition_id: str) -> bool:
        """Whether the acquisition is among the recent ones (a replay after a crash: already counted)."""
        return any(t.acquisition_id == acquisition_id for t in self.recent)

    def add_recent(self, tile: RecentTile, capacity: int) -> None:
        """Remember a new acquisition, keeping the last ``capacity``."""
        if self.recent.maxlen != capacity:
            self.recent = deque(self.recent, maxlen=capacity)
        self.recent.append(tile)

    def to_bytes(self) -> bytes:
        """The stored form (compact JSON)."""
        payload = {
            "format": STATE_FORMAT,
            "monitor": self.monitor.state_dict(),
            "trigger": self.trigger.to_dict(),
            "recent": [[t.acquisition_id, t.href] for t in self.recent],
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, monitor: RegionMonitor, capacity: int) -> RegionState:
        """Restore a stored state onto ``monitor`` (fresh, configured and calibrated by this process's settings).

        Raises:
            ValueError: The bytes are not a region state of a format this reader knows.

        """
        payload = json.loads(data)
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
            raise ValueError(f"not a region state of format {STATE_FORMAT}")
        monitor.load_state_dict(payload["monitor"])
        recent = deque((RecentTile(str(i), str(h)) for i, h in payload["recent"]), maxlen=capacity)
        return cls(monitor, TriggerState.from_dict(payload["trigger"]), recent)


def restore_region(data: bytes | None, new_monitor: Callable[[], RegionMonitor], capacity: int) -> RegionState:
    """A region's state from its stored bytes; a fresh one for a new region or unreadable bytes.

    A stuck region (every acquisition dead-lettered because its state cannot be read) is worse than a fresh
    monitor, so unreadable bytes are logged and replaced.
    """
    if data is not None:
        try:
            return RegionState.from_bytes(data, new_monitor(), capacity)
        except UNREADABLE_STATE as exc:
            log.error("stored region state unreadable (%s): starting the region afresh", exc)
    return RegionState(new_monitor())


def restore_tracker(data: bytes | None, num_classes: int, window: int) -> DelayedLabelTracker:
    """A region's delayed-label tracker from its stored bytes; a fresh one when new or unreadable."""
    tracker = DelayedLabelTracker(num_classes, window)
    if data is not None:
        try:
            tracker.load_state_dict(json_object(data))
        except UNREADABLE_STATE as exc:
            log.error("stored label state unreadable (%s): starting the region's accuracy afresh", exc)
            tracker = DelayedLabelTracker(num_classes, window)
    return tracker
