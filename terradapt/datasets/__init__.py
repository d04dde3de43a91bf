"""Datasets as regions of tiles: FLAIR-1 on disk, the real Dubai aerial set and seeded synthetic FLAIR scenes.

All of them implement `TileDataset` and yield `Sample` records, so training, evaluation and the demo stream do
not care where tiles come from.
"""

from terradapt.datasets.base import Sample, TileDataset, iter_patches
from terradapt.datasets.dubai import DubaiDataset
from terradapt.datasets.flair import FlairDataset, discover
from terradapt.datasets.synthetic import (
    DEPARTEMENTS,
    DomainFactors,
    SyntheticDataset,
    generate_scene,
    write_flair_dataset,
)

__all__ = [
    "DEPARTEMENTS",
    "DomainFactors",
    "DubaiDataset",
    "FlairDataset",
    "Sample",
    "SyntheticDataset",
    "TileDataset",
    "discover",
    "generate_scene",
    "iter_patches",
    "write_flair_dataset",
]
