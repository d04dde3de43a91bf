"""One region's stream state: its monitor, its trigger counters, its recent tiles. One serialisation, every runner.

The embedded runner keeps the bytes in a dict, the faust worker in a changelog-backed table keyed by region (so
it survives restarts and rebalances, and moves with the partition). What is stored is small and bounded: the
monitor's *stream* state (windows, latches, re-baseline offsets; never the calibration, which every process
rebuilds from the calibration data with its own settings), two counters, and the ids and hrefs of the last
``buffer_tiles`` acquisitions (the tiles an adaptation job reads back from object storage).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field

from adapters.trigger import TriggerState
from monitoring.monitor import RegionMonitor

STATE_FORMAT = 1


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
