"""Bounded buffer of each region's most recent tiles: what an adaptation job adapts and gates on."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class BufferedTile:
    """One recent tile of a region (image, optional label, and its acquisition id)."""

    acquisition_id: str
    image: npt.NDArray[np.uint8]
    mask: npt.NDArray[np.uint8] | None = None
    href: str = ""


class TileBuffer:
    """Per-region ring buffers with a fixed capacity (memory stays bounded on endless streams)."""

    def __init__(self, capacity: int = 32) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; accepted: >= 1")
        self.capacity = capacity
        self._tiles: dict[str, deque[BufferedTile]] = {}

    def add(self, region: str, tile: BufferedTile) -> None:
        """Append a tile, dropping the region's oldest when full."""
        self._tiles.setdefault(region, deque(maxlen=self.capacity)).append(tile)

    def recent(self, region: str, n: int | None = None) -> list[BufferedTile]:
        """The region's ``n`` most recent tiles (all when ``n`` is None), oldest first."""
        tiles = list(self._tiles.get(region, ()))
        return tiles if n is None else tiles[-n:]

    def __len__(self) -> int:
        return sum(len(d) for d in self._tiles.values())
