"""Contract tests generated from the adapter registry: every adapter, test id = its name."""

import pytest
import torch

from adapters.common import MissingSourceTilesError
from adapters.registry import adapter_class, available_adapters, create_adapter
from terradapt.errors import UnknownNameError
from terradapt.model import UNet, UNetConfig


def _toy_model() -> UNet:
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=5, num_classes=4, base_channels=4, depth=2))
    model.train()
    with torch.no_grad():  # give BN running stats something non-trivial
        for _ in range(3):
            model(torch.rand(2, 5, 32, 32) * 255)
    return model.eval()


def _source_tiles(name: str) -> torch.Tensor | None:
    """Source tiles for methods that replay them (seeded, source-like radiometry)."""
    if adapter_class(name).source_replay == "none":
        return None
    return torch.rand(6, 5, 32, 32, generator=torch.Generator().manual_seed(7)) * 255


@pytest.mark.parametrize("name", available_adapters())
@pytest.mark.parametrize("batch", [1, 4])
def test_adapter_changes_only_declared_names_and_resets_exactly(name, batch):
    model = _toy_model()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = create_adapter(name, model, source_tiles=_source_tiles(name))
    x = torch.rand(8, 5, 32, 32) * 200 + 30
    adapted = adapter.adapt(x[i : i + batch] for i in range(0, 8, batch))
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, source[k])}
    assert changed, "adaptation changed nothing"
    assert changed <= adapter.changed_names()
    # the model given to the adapter is never modified in place
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())


@pytest.mark.parametrize("name", available_adapters())
def test_adapter_state_round_trip(name):
    model = _toy_model()
    a = create_adapter(name, model, source_tiles=_source_tiles(name))
    a.adapt([torch.rand(2, 5, 32, 32) * 255])
    b = create_adapter(name, model, source_tiles=_source_tiles(name))
    b.load_state_dict(a.state_dict())
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])


@pytest.mark.parametrize("name", [n for n in available_adapters() if adapter_class(n).source_replay == "required"])
def test_replay_methods_refuse_to_start_without_source_tiles(name):
    with pytest.raises(MissingSourceTilesError, match="source_tiles"):
        create_adapter(name, _toy_model())


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="bn"):
        create_adapter("nope", UNet(UNetConfig(base_channels=4, depth=1)))
