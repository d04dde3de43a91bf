"""Class nomenclatures: FLAIR (19 raw labels -> 13 classes) and the Dubai aerial set (6 colours -> 5 classes)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Label value for pixels that are ignored by losses and metrics.
IGNORE_INDEX = 255

#: The 13 FLAIR classes used by the FLAIR-1 baseline (raw labels 13..19 are grouped into "other").
FLAIR_CLASSES: tuple[str, ...] = (
    "building",
    "pervious surface",
    "impervious surface",
    "bare soil",
    "water",
    "coniferous",
    "deciduous",
    "brushwood",
    "vineyard",
    "herbaceous vegetation",
    "agricultural land",
    "plowed land",
    "other",
)

#: FLAIR-1's colour of each of the 13 classes (the dataset's legend; "other" is raw label 19's black).
FLAIR_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0xDB, 0x0E, 0x9A),  # building
    (0x93, 0x8E, 0x7B),  # pervious surface
    (0xF8, 0x0C, 0x00),  # impervious surface
    (0xA9, 0x71, 0x01),  # bare soil
    (0x15, 0x53, 0xAE),  # water
    (0x19, 0x4A, 0x26),  # coniferous
    (0x46, 0xE4, 0x83),  # deciduous
    (0xF3, 0xA6, 0x0D),  # brushwood
    (0x66, 0x00, 0x82),  # vineyard
    (0x55, 0xFF, 0x00),  # herbaceous vegetation
    (0xFF, 0xF3, 0x0D),  # agricultural land
    (0xE4, 0xDF, 0x7C),  # plowed land
    (0x00, 0x00, 0x00),  # other
)

#: Raw FLAIR mask values 1..19 (0 and >19 are invalid and become IGNORE_INDEX).
FLAIR_RAW_LABELS: tuple[str, ...] = (
    "building",
    "pervious surface",
    "impervious surface",
    "bare soil",
    "water",
    "coniferous",
    "deciduous",
    "brushwood",
    "vineyard",
    "herbaceous vegetation",
    "agricultural land",
    "plowed land",
    "swimming pool",
    "snow",
    "clear cut",
    "mixed",
    "ligneous",
    "greenhouse",
    "other",
)

FLAIR_BANDS: tuple[str, ...] = ("red", "green", "blue", "nir", "elevation")


def _flair_lut() -> npt.NDArray[np.uint8]:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw in range(1, 13):
        lut[raw] = raw - 1
    for raw in range(13, 20):
        lut[raw] = 12
    return lut


_FLAIR_LUT = _flair_lut()


def flair_to_13(mask: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
    """Map raw FLAIR labels (1..19) to class indices 0..12; anything else becomes IGNORE_INDEX."""
    clipped = np.clip(mask, 0, 255).astype(np.uint8)
    mapped: npt.NDArray[np.uint8] = _FLAIR_LUT[clipped]
    return mapped


DUBAI_CLASSES: tuple[str, ...] = ("building", "land", "road", "vegetation", "water")

#: Mask colours actually present in the Dubai masks (shared/data/README.md); the last one is "unlabeled".
DUBAI_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0x3C, 0x10, 0x98),  # building
    (0x84, 0x29, 0xF6),  # land
    (0x6E, 0xC1, 0xE4),  # road
    (0xFE, 0xDD, 0x3A),  # vegetation
    (0xE2, 0xA9, 0x29),  # water
    (0x9B, 0x9B, 0x9B),  # unlabeled -> IGNORE_INDEX
)
