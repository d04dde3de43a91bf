"""One region's crop stream state, as the crop worker's table stores it (bytes: compact JSON).

What is stored is small and bounded: the series monitor's stream state (never its calibration: every process
rebuilds that from the registry's calibration vectors with its own settings), the trigger's counters, the number of
parcels and jobs, and the series items of the last ``buffer_parcels`` valid parcels (ids, hrefs, checksums, dates:
what an adaptation job reads back from object storage).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.trigger import TriggerState
from monitoring.series_monitor import SeriesMonitor
from stream.state import UNREADABLE_STATE
from terradapt.crops.records import SeriesAcquisition

__all__ = ["CropState", "restore_crop_state"]

log = logging.getLogger(__name__)

CROP_STATE_FORMAT = 1


@dataclass
class CropState:
    """A region's crop loop state between messages."""

    monitor: SeriesMonitor
    trigger: TriggerState = field(default_factory=TriggerState)
    recent: deque[SeriesAcquisition] = field(default_factory=deque)
    parcels: int = 0
    jobs: int = 0

    def seen(self, acquisition_id: str) -> bool:
        """Whether the series is among the recent ones (a replay: already counted)."""
        return any(s.id == acquisition_id for s in self.recent)

    def add_recent(self, item: SeriesAcquisition, capacity: int) -> None:
        """Remember a valid series, keeping the last ``capacity``."""
        if self.recent.maxlen != capacity:
            self.recent = deque(self.recent, maxlen=capacity)
        self.recent.append(item)

    def to_bytes(self) -> bytes:
        """The stored form (compact JSON)."""
        payload = {
            "format": CROP_STATE_FORMAT,
            "monitor": self.monitor.state_dict(),
            "trigger": self.trigger.to_dict(),
            "recent": [s.model_dump(mode="json") for s in self.recent],
            "parcels": self.parcels,
            "jobs": self.jobs,
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, monitor: SeriesMonitor, capacity: int) -> CropState:
        """Restore a stored state onto ``monitor`` (fresh, configured and calibrated by this process's settings).

        Raises:
            ValueError: the bytes are not a crop state of a format this reader knows.

        """
        payload = json.loads(data)
        if not isinstance(payload, dict) or payload.get("format") != CROP_STATE_FORMAT:
            raise ValueError(f"not a crop region state of format {CROP_STATE_FORMAT}")
        monitor.load_state_dict(payload["monitor"])
        recent = deque((SeriesAcquisition.model_validate(s) for s in payload["recent"]), maxlen=capacity)
        return cls(
            monitor, TriggerState.from_dict(payload["trigger"]), recent, int(payload["parcels"]), int(payload["jobs"])
        )


def restore_crop_state(data: bytes | None, new_monitor: Callable[[], SeriesMonitor], capacity: int) -> CropState:
    """A region's crop state from its stored bytes; a fresh one for a new region or unreadable bytes (logged)."""
    if data is not None:
        try:
            return CropState.from_bytes(data, new_monitor(), capacity)
        except UNREADABLE_STATE as exc:  # pydantic's ValidationError is a ValueError
            log.error("stored crop region state unreadable (%s): starting the region afresh", exc)
    return CropState(new_monitor(), recent=deque(maxlen=capacity))
