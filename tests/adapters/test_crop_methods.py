"""The crop methods recover accuracy on synthetic shifted countries (seeded, measured against source-only)."""

import pytest
import torch

from adapters.crops.registry import create_crop_adapter
from terradapt.crops.batch import iter_batches
from terradapt.crops.synthetic import COUNTRIES, CROP_CLASSES, generate_country
from terradapt.crops.training import predict, score
from tests.fakes.crops import source_model, source_prior


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _accuracy(model, parcels) -> float:
    return score(predict(model, parcels), [p.label for p in parcels], len(CROP_CLASSES)).overall_accuracy


def _run(method: str, region: str, config: dict[str, object] | None = None):
    """(source-only accuracy, adapted accuracy, adapted model): adapt on 160 stream parcels, test on 200 others."""
    model = source_model()
    stream = generate_country(COUNTRIES[region], 160, seed=2)
    test = generate_country(COUNTRIES[region], 200, seed=1)
    adapter = create_crop_adapter(method, model, config, class_prior=source_prior())
    adapted = adapter.adapt(batch for batch, _ in iter_batches(stream, 16, seed=3))
    return _accuracy(model, test), _accuracy(adapted, test), adapted


@pytest.mark.parametrize(("region", "shift"), [("dk-1", 24), ("si-1", -18)])
def test_phenology_estimates_the_offset_and_recovers_accuracy(region, shift):
    before, after, adapted = _run("phenology", region)
    assert before < 0.8
    assert after > 0.9 and after > before + 0.15
    assert float(adapted.date_offset) == pytest.approx(-shift, abs=8)


def test_phenology_leaves_a_source_country_alone():
    before, after, adapted = _run("phenology", "fr-1")
    assert abs(float(adapted.date_offset)) <= 4
    assert after >= before - 0.02


def test_bn_reestimation_recovers_a_sensor_gain_change():
    before, after, _ = _run("bn", "pt-1")
    assert before < 0.5
    assert after > 0.9


def test_phenology_bn_handles_gain_and_shift():
    before, after, adapted = _run("phenology-bn", "pt-1")
    assert before < 0.5 and after > 0.9
    assert abs(float(adapted.date_offset)) <= 6
    before, after, adapted = _run("phenology-bn", "lv-1")
    assert before < 0.8 and after > 0.9
