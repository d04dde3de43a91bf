"""Shared fixtures of the integration tests: a tiny trained source model and FLAIR-format tiles on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from terradapt.checkpoint import save_checkpoint
from terradapt.datasets.flair import FlairDataset
from terradapt.datasets.synthetic import SyntheticDataset, write_flair_dataset
from terradapt.model import UNetConfig
from terradapt.training import TrainConfig, train_source_checkpoint
from tests.stream.kafka.stack import Stack

SIZE = 128


@pytest.fixture(scope="session")
def source_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A small source model trained on D033 + D040, and held-out source tiles for calibration."""
    ds = SyntheticDataset({"D033": 56, "D040": 56}, size=SIZE, seed=11)
    samples = [ds.load(r, t) for r in ds.regions() for t in ds.tile_ids(r)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(samples))
    train = [samples[i] for i in order[:48]]
    held = [samples[i] for i in order[48:]]
    model, manifest = train_source_checkpoint(
        [s.image for s in train],
        [s.mask for s in train if s.mask is not None],
        UNetConfig(in_channels=5, num_classes=13, base_channels=8),
        TrainConfig(steps=150, crop=SIZE, seed=0, device="cpu"),
        classes=ds.classes,
        bands=ds.band_names,
        regions=("D033", "D040"),
    )
    directory = tmp_path_factory.mktemp("source")
    save_checkpoint(directory, model, manifest)
    return directory, [s.image for s in held]


@pytest.fixture(scope="session")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """FLAIR-layout GeoTIFFs to stream: an in-distribution and a shifted departement."""
    root = tmp_path_factory.mktemp("flair")
    write_flair_dataset(root, {"D033": 50, "D013": 50}, size=SIZE, seed=23)
    ds = FlairDataset(root)
    # FLAIR zones are ordered (urban, mixed, rural): stream in a seeded random order so the in-distribution
    # region really has the source mix; a zone-ordered stream is a genuine class-mix change the monitor reports
    rng = np.random.default_rng(5)
    out = {}
    for region in ds.regions():
        paths = sorted(root.glob(f"{region}_*/*/img/*.tif"))
        out[region] = [paths[i] for i in rng.permutation(len(paths))]
    return out


@pytest.fixture
def make_stack(tmp_path: Path, source_checkpoint: tuple[Path, list[np.ndarray]]) -> Iterator[object]:
    """Factory of isolated stacks; every worker is stopped at the end of the test."""
    stacks: list[Stack] = []

    def factory(extra_env: dict[str, str] | None = None) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", extra_env)
        stack.root.mkdir(parents=True, exist_ok=True)
        stack.publish_source(*source_checkpoint)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop_all()
