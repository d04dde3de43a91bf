"""Which of a job's tiles carry information: flat, clipped and duplicated tiles are no evidence about a region.

A poisoned stream (a sensor sending all-black frames, a saturated detector, one tile re-sent over and over) can
raise a real drift alarm: those tiles *are* far from the source distribution. Adapting on them re-estimates
BatchNorm statistics from a constant image, or minimises entropy on it, and the label-free gate, judging the
candidate on the same tiles, sees nothing wrong: measured on the test world (tests/stream/test_poisoned_streams.py),
every method's candidate passed the gate and dropped the region's clean mIoU from 0.33 to 0.01-0.29. The label-free
checks compare two models' outputs on the tiles they are given; on tiles without content that comparison says
nothing about the region's real imagery, so it must not decide.

A tile is *uninformative* when

* it is flat: every band's spatial standard deviation is below ``min_std`` digital numbers (an all-black or
  all-white frame, a constant fill);
* it is clipped: more than ``max_clipped_share`` of its pixels are at the dtype's floor or ceiling in every band
  (a frame mostly black or saturated, with a little texture left);
* it duplicates an earlier tile of the job byte for byte (the same content counted again adds no evidence and,
  repeated, would weigh one tile as many).

``screen`` keeps the informative distinct tiles; the job is usable when they are at least ``min_informative_share``
of its tiles (and at least one). ``informative_tiles`` is what a job adapts on (the pipeline calls it on the tiles
it read back): the informative distinct tiles when they are enough, else every tile, so that the gate, screening
the same tiles with the same settings, refuses the candidate with the ``degenerate tiles`` reason recorded in the
version's manifest. The defaults are deliberately loose: on the synthetic departements, every
radiometric shift preset included, no tile is excluded (tests/adapters/test_tile_quality.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from adapters.buffer import BufferedTile
from terradapt.settings import StrictModel


class TileQualityConfig(StrictModel):
    """When a job's tiles are evidence enough to adapt on and to judge a candidate with."""

    enabled: bool = Field(default=True, description="screen the job's tiles (off: every tile counts)")
    min_std: float = Field(default=1.0, ge=0.0, description="a tile whose every band varies less than this is flat")
    max_clipped_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="share of pixels at the dtype's floor/ceiling in every band"
    )
    deduplicate: bool = Field(default=True, description="count byte-identical tiles once")
    min_informative_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="informative distinct tiles needed, as a share of the job's tiles"
    )


@dataclass(frozen=True)
class Screening:
    """What ``screen`` found: the indices of informative distinct tiles, and the excluded ones by cause."""

    total: int
    informative: tuple[int, ...]
    flat: tuple[int, ...] = ()
    clipped: tuple[int, ...] = ()
    duplicate: tuple[int, ...] = ()
    min_share: float = 0.0

    @property
    def usable(self) -> bool:
        """Whether the informative distinct tiles are enough to adapt on and to judge a candidate with."""
        return bool(self.informative) and len(self.informative) >= self.min_share * self.total

    @property
    def excluded(self) -> int:
        """How many tiles were set aside."""
        return self.total - len(self.informative)

    def reason(self) -> str:
        """The gate's refusal reason (starts with ``degenerate tiles``, the reason's stable prefix)."""
        return (
            f"degenerate tiles: {len(self.informative)} informative distinct of {self.total} "
            f"(need {self.min_share:.0%}; flat {len(self.flat)}, clipped {len(self.clipped)}, "
            f"duplicate {len(self.duplicate)})"
        )

    def metrics(self) -> dict[str, float]:
        """Counts for the gate's metrics (kept in the version's manifest)."""
        return {
            "tiles_informative": float(len(self.informative)),
            "tiles_flat": float(len(self.flat)),
            "tiles_clipped": float(len(self.clipped)),
            "tiles_duplicate": float(len(self.duplicate)),
        }


def _limits(dtype: np.dtype[Any]) -> tuple[float, float]:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 255.0  # float tiles carry digital numbers on the uint8 scale


def _flat(image: npt.NDArray[Any], min_std: float) -> bool:
    bands = image.reshape(image.shape[0], -1).astype(np.float64)
    return bool(np.all(bands.std(axis=1) < min_std))


def clipped_share(image: npt.NDArray[Any]) -> float:
    """Share of pixels at the dtype's floor in every band or at its ceiling in every band (image C, H, W)."""
    low, high = _limits(image.dtype)
    return float(np.mean(np.all(image <= low, axis=0) | np.all(image >= high, axis=0)))


def screen(images: Sequence[npt.NDArray[Any]], config: TileQualityConfig | None = None) -> Screening:
    """Sort a job's tiles (each C, H, W) into informative distinct ones and excluded ones (flat, clipped, duplicate).

    A tile is counted under its first cause only (flat before clipped before duplicate). With the screen off,
    every tile is informative.
    """
    cfg = config or TileQualityConfig()
    if not cfg.enabled:
        return Screening(len(images), tuple(range(len(images))))
    informative: list[int] = []
    flat: list[int] = []
    clipped: list[int] = []
    duplicate: list[int] = []
    seen: set[bytes] = set()
    for i, image in enumerate(images):
        arr = np.ascontiguousarray(image)
        if _flat(arr, cfg.min_std):
            flat.append(i)
            continue
        if clipped_share(arr) > cfg.max_clipped_share:
            clipped.append(i)
            continue
        if cfg.deduplicate:
            digest = hashlib.blake2b(arr.tobytes(), digest_size=16)
            digest.update(repr((arr.shape, arr.dtype.str)).encode())
            key = digest.digest()
            if key in seen:
                duplicate.append(i)
                continue
            seen.add(key)
        informative.append(i)
    return Screening(
        len(images), tuple(informative), tuple(flat), tuple(clipped), tuple(duplicate), cfg.min_informative_share
    )


def informative_tiles(tiles: Sequence[BufferedTile], config: TileQualityConfig | None = None) -> list[BufferedTile]:
    """The tiles a job adapts and is judged on: the informative distinct ones, when they are enough.

    When they are not, every tile is returned unchanged: the gate screens them again and refuses the candidate
    with the reason (a job never shrinks to a handful of tiles that would then look usable).
    """
    found = screen([t.image for t in tiles], config)
    if not found.usable:
        return list(tiles)
    return [tiles[i] for i in found.informative]
