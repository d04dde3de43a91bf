"""Contract tests generated from the crop adapter registry (test id = the method's name)."""

import pytest
import torch
from pydantic import ValidationError

from adapters.crops.registry import available_crop_adapters, create_crop_adapter
from terradapt.crops.batch import to_batch
from terradapt.crops.model import PseLtae, PseLtaeConfig
from terradapt.crops.synthetic import COUNTRIES, generate_country
from terradapt.errors import UnknownNameError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _toy_model(seed: int = 0) -> PseLtae:
    """A seeded, untrained model whose BatchNorm statistics have seen a few source batches."""
    torch.manual_seed(seed)
    model = PseLtae(PseLtaeConfig(in_channels=10, num_classes=6, pse_dim=16, d_model=16, temporal_dim=16))
    model.train()
    with torch.no_grad():
        for k in range(3):
            model(to_batch(generate_country(COUNTRIES["fr-1"], 6, seed=k), pixels=4))
    return model.eval()


def _target(n: int, seed: int = 0):
    return to_batch(generate_country(COUNTRIES["lv-1"], n, seed=seed), pixels=4)


@pytest.mark.parametrize("name", available_crop_adapters())
@pytest.mark.parametrize("batch", [1, 4])
def test_crop_adapter_changes_only_declared_names_and_resets_exactly(name, batch):
    model = _toy_model()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = create_crop_adapter(name, model, {"min_parcels": 1} if "phenology" in name else None)
    target = _target(12)
    adapted = adapter.adapt(target.select(slice(i, i + batch)) for i in range(0, 12, batch))
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, source[k])}
    assert changed, "adaptation changed nothing"
    assert changed <= adapter.changed_names()
    assert not adapted.training
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items()), "the given model was modified"
    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())


@pytest.mark.parametrize("name", available_crop_adapters())
def test_crop_adapter_reset_is_idempotent_and_state_round_trips(name):
    model = _toy_model()
    a = create_crop_adapter(name, model)
    a.adapt([_target(10, seed=1)])
    b = create_crop_adapter(name, model)
    b.load_state_dict(a.state_dict())
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    # the method state came along: one more identical batch gives identical models
    a.adapt([_target(6, seed=2)])
    b.adapt([_target(6, seed=2)])
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k])
    a.reset()
    first = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.reset()
    assert all(torch.equal(v, first[k]) for k, v in a.model.state_dict().items())


def test_unknown_crop_method_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="phenology"):
        create_crop_adapter("nope", _toy_model())


@pytest.mark.parametrize("name", available_crop_adapters())
def test_crop_method_configs_reject_unknown_keys(name):
    with pytest.raises(ValidationError, match="extra"):
        create_crop_adapter(name, _toy_model(), {"no_such_key": 1})
