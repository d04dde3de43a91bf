"""The dashboard's drift colour scale (score / threshold), shared by the departement and the country maps."""

from __future__ import annotations

import math
from typing import Final

__all__ = ["DRIFT_SCALE", "NOT_MONITORED", "drift_colour"]

#: Drift colour scale on score / threshold (1 = the calibrated alarm line), from calm to far past the line.
DRIFT_SCALE: Final[tuple[tuple[float, str, str], ...]] = (
    (0.5, "#1a9850", "< 0.5"),
    (0.8, "#91cf60", "0.5 - 0.8"),
    (1.0, "#fee08b", "0.8 - 1 (close to threshold)"),
    (2.0, "#fc8d59", "1 - 2 (alarm)"),
    (math.inf, "#d73027", ">= 2 (strong drift)"),
)
NOT_MONITORED: Final = "#e0e0e0"


def drift_colour(ratio: float | None) -> str:
    """Fill colour of a region whose largest score / threshold is ``ratio`` (None: not monitored)."""
    if ratio is None or math.isnan(ratio):
        return NOT_MONITORED
    return next(colour for upper, colour, _ in DRIFT_SCALE if ratio < upper)
