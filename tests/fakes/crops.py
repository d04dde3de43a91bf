"""A small seeded crop model trained once per test session on the synthetic source countries (about 4 s on CPU)."""

from __future__ import annotations

from functools import lru_cache

import torch

from terradapt.crops.model import CropModel
from terradapt.crops.series import ParcelSeries
from terradapt.crops.synthetic import COUNTRIES, CROP_CLASSES, generate_country
from terradapt.crops.training import CropTrainConfig, train_crop_model

SOURCES = ("fr-1", "de-1")


@lru_cache(maxsize=1)
def source_parcels() -> tuple[ParcelSeries, ...]:
    """200 labelled parcels of each source country."""
    return tuple(p for region in SOURCES for p in generate_country(COUNTRIES[region], 200, seed=0))


@lru_cache(maxsize=1)
def _trained() -> CropModel:
    torch.manual_seed(0)
    model, _ = train_crop_model(list(source_parcels()), len(CROP_CLASSES), CropTrainConfig(epochs=8, batch_size=32))
    return model


def source_model() -> CropModel:
    """The session's trained source model (the shared instance: adapters copy it, tests must not edit it)."""
    return _trained()


def source_prior() -> torch.Tensor:
    """Class counts of the source parcels."""
    return torch.bincount(torch.tensor([p.label for p in source_parcels()]), minlength=len(CROP_CLASSES)).float()
