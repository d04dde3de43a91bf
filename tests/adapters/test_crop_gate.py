"""The crop gate: ships repairs of shifted countries, refuses candidates that collapse or lose information."""

import copy

import pytest
import torch

from adapters.crops.gate import CropGate, CropGateConfig
from adapters.crops.registry import create_crop_adapter
from terradapt.crops.batch import iter_batches
from terradapt.crops.synthetic import COUNTRIES, generate_country
from tests.fakes.crops import source_model, source_prior


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _parcels(region: str, seed: int):
    batches, labels = zip(*iter_batches(generate_country(COUNTRIES[region], 96, seed=seed), 32, seed=4), strict=True)
    return list(batches), torch.cat(labels)


def _adapted(method: str, region: str):
    stream = generate_country(COUNTRIES[region], 160, seed=2)
    adapter = create_crop_adapter(method, source_model(), class_prior=source_prior())
    return adapter.adapt(b for b, _ in iter_batches(stream, 16, seed=3))


@pytest.mark.parametrize(("method", "region"), [("phenology-bn", "lv-1"), ("bn", "pt-1"), ("phenology", "dk-1")])
def test_repairs_of_shifted_countries_pass_label_free_and_labelled(method, region):
    batches, labels = _parcels(region, seed=21)  # parcels the candidate did not adapt on
    gate = CropGate()
    candidate = _adapted(method, region)
    result = gate.check(candidate, source_model(), batches)
    assert result.accepted, result
    assert result.metrics["candidate_information"] > result.metrics["current_information"]
    labelled = gate.check(candidate, source_model(), batches, labels)
    assert labelled.accepted and labelled.metrics["candidate_accuracy"] > labelled.metrics["current_accuracy"]


def test_a_wrong_offset_on_a_source_country_is_refused():
    wrong = copy.deepcopy(source_model())
    wrong.set_date_offset(40)
    batches, labels = _parcels("fr-1", seed=21)
    result = CropGate().check(wrong, source_model(), batches, labels)
    assert not result.accepted
    assert {"information_drop", "accuracy_drop"} <= set(result.reasons)


def test_a_collapsed_candidate_is_refused():
    collapsed = copy.deepcopy(source_model())
    with torch.no_grad():
        collapsed.classifier().bias[2] += 50.0
    batches, _ = _parcels("fr-1", seed=21)
    result = CropGate().check(collapsed, source_model(), batches)
    assert {"class_collapse", "entropy_collapse", "information_drop"} <= set(result.reasons)


def test_confidence_alone_is_not_a_collapse():
    """A confident repair of a very unsure model keeps its class mix: not refused as an entropy collapse."""
    unsure = copy.deepcopy(source_model())
    with torch.no_grad():
        unsure.classifier().weight.mul_(0.05)  # same argmax on most parcels, far higher entropy
        unsure.classifier().bias.mul_(0.05)
    batches, _ = _parcels("fr-1", seed=21)
    result = CropGate().check(source_model(), unsure, batches)
    m = result.metrics
    assert m["candidate_entropy"] < CropGateConfig().min_entropy_ratio * m["current_entropy"]  # far more confident
    assert m["candidate_share_entropy"] >= m["current_share_entropy"] - 1e-6  # as diverse
    assert "entropy_collapse" not in result.reasons and result.accepted, result


def test_the_gate_refuses_bad_inputs_and_unknown_config_keys():
    batches, labels = _parcels("fr-1", seed=21)
    with pytest.raises(ValueError, match="parcel"):
        CropGate().check(source_model(), source_model(), [])
    with pytest.raises(ValueError, match="labels"):
        CropGate().check(source_model(), source_model(), batches, labels[:3])
    with pytest.raises(ValueError, match="extra"):
        CropGateConfig.model_validate({"max_share": 0.5})
