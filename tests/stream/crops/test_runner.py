"""The in-process crop loop on one unshifted and one shifted synthetic country (seeded; measured margins)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from monitoring.metrics import ServiceMetrics
from serving.crop_registry import CropRegistry
from serving.store import MemoryReader, MemoryStore
from stream.crops.config import CropLoopConfig
from stream.crops.demo import FR2, corrupt_item, evaluate, source_registry, stream_items
from stream.crops.runner import CropLoop, ParcelLog
from terradapt.crops.model import CropModel
from terradapt.crops.series import ParcelSeries
from terradapt.crops.synthetic import COUNTRIES, generate_country
from tests.fakes.crops import SOURCES, source_model, source_parcels

LV = COUNTRIES["lv-1"]
N_STREAM = 160


def calibration() -> list[ParcelSeries]:
    """Held-out source parcels (another generator seed than the training parcels)."""
    return [p for r in SOURCES for p in generate_country(COUNTRIES[r], 64, seed=4)]


def stream(factors, n: int = N_STREAM) -> list[ParcelSeries]:
    return generate_country(factors, n, seed=2)


@dataclasses.dataclass
class Run:
    loop: CropLoop
    registry: CropRegistry
    source: CropModel
    metrics: CollectorRegistry
    logs: list[ParcelLog]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    torch.set_num_threads(1)
    model = source_model()
    registry = source_registry(tmp_path_factory.mktemp("crops") / "registry", model, source_parcels())
    prom = CollectorRegistry()
    logs: list[ParcelLog] = []
    loop = CropLoop(CropLoopConfig(), registry, calibration(), metrics=ServiceMetrics(prom), on_parcel=logs.append)
    for factors in (FR2, LV):
        parcels = stream(factors)
        bad = dataclasses.replace(parcels[3], values=np.full_like(parcels[3].values, np.nan), parcel_id="BAD1")
        parcels.insert(5, bad)
        loop.run(parcels)
    return Run(loop, registry, model, prom, logs)


def test_unshifted_country_keeps_the_source_model(run: Run) -> None:
    assert run.loop.result.parcels["fr-2"] == N_STREAM
    assert "fr-2" not in run.loop.result.first_detection
    assert not [e for e in run.loop.result.drift_events if e.region == "fr-2"]
    assert run.loop.result.published("fr-2") == []
    assert run.registry.current("fr-2") == 0


def test_shifted_country_drifts_adapts_and_beats_the_source(run: Run) -> None:
    result = run.loop.result
    assert result.first_detection["lv-1"] <= 32  # the first full windows (16 parcels) of the stream
    event = next(e for e in result.drift_events if e.region == "lv-1")
    assert event.covariate
    versions = result.published("lv-1")
    assert versions and run.registry.current("lv-1") == versions[-1]
    adapted, manifest = run.registry.load("lv-1")  # sha256-verified
    assert manifest.method == "phenology-bn" and manifest.parent == 0 and manifest.gate_accepted
    # lv-1's season runs 32 days later: the offset moves the calendar back (true value -32)
    assert -40 <= float(adapted.date_offset) <= -15
    test = generate_country(LV, 300, seed=1)
    oa_source, f1_source = evaluate(run.source, test)
    oa_system, f1_system = evaluate(adapted, test)
    assert oa_system >= oa_source + 0.10, (oa_source, oa_system)
    assert f1_system >= f1_source + 0.10, (f1_source, f1_system)
    # after the switch the region's parcels are predicted by the new version
    assert run.logs[-1].region == "lv-1" and run.logs[-1].version == versions[-1]


def test_invalid_series_becomes_a_dead_letter_and_the_loop_goes_on(run: Run) -> None:
    letters = run.loop.result.dead_letters
    assert [(d.reason, d.key, d.stage) for d in letters] == [
        ("nan_share", "fr-2", "ingest"),
        ("nan_share", "lv-1", "ingest"),
    ]
    assert "BAD1" in letters[0].payload and "NaN" in letters[0].error
    assert run.metrics.get_sample_value("terradapt_dead_letters_total", {"reason": "nan_share"}) == 2
    assert (
        run.metrics.get_sample_value("terradapt_tiles_processed_total", {"region": "lv-1", "outcome": "ok"}) == N_STREAM
    )


def test_metrics_carry_the_region_label(run: Run) -> None:
    accepted = run.metrics.get_sample_value(
        "terradapt_adaptation_runs_total", {"region": "lv-1", "method": "phenology-bn", "outcome": "accepted"}
    )
    assert accepted is not None and accepted >= 1
    current = run.metrics.get_sample_value("terradapt_model_current_version", {"region": "lv-1"})
    assert current == run.registry.current("lv-1")
    assert run.metrics.get_sample_value("terradapt_model_current_version", {"region": "fr-2"}) == 0


def test_the_loop_is_label_free(run: Run) -> None:
    for state in run.loop.regions.values():
        assert {p.label for p in state.buffer} == {-1}


def test_series_items_through_the_object_store(tmp_path: Path) -> None:
    """STAC series items read through the reader; a corrupt file and a missing object are dead letters."""
    registry = source_registry(tmp_path / "registry", source_model(), source_parcels())
    objects = MemoryStore("series")
    items = stream_items(objects, stream(FR2, 20), "FR")
    broken = corrupt_item(objects, items[0])
    missing = items[1].model_copy(update={"id": "gone", "href": "memory://series/fr-2/gone.npz", "sha256": None})
    tampered = items[2].model_copy(update={"id": "tampered", "sha256": "0" * 64})
    config = CropLoopConfig(batch_parcels=8)
    loop = CropLoop(config, registry, calibration(), reader=MemoryReader(objects))
    result = loop.run([*items, broken, missing, tampered])
    assert result.parcels["fr-2"] == 20
    assert sorted(d.reason for d in result.dead_letters) == ["checksum_mismatch", "invalid_series", "missing_object"]
    assert all(d.payload.startswith("{") for d in result.dead_letters)  # the STAC item, kept whole
