"""A tile an adaptation job adapts and gates on (read back from object storage by its href)."""

from __future__ import annotations

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
