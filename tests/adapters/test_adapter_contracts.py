"""Contract tests generated from the adapter registry: every adapter (test id = its name) on every architecture
of the contract set (the small U-Net, smp Unet and DeepLabV3+ with a resnet18 encoder)."""

import pytest
import torch

from adapters.common import MissingSourceTilesError
from adapters.registry import adapter_class, available_adapters, create_adapter
from terradapt.errors import UnknownNameError
from terradapt.model import UNet, UNetConfig
from tests.fakes.archs import ARCH_IDS, tile_size, toy_model


def _source_tiles(name: str, size: int = 32) -> torch.Tensor | None:
    """Source tiles for methods that replay them (seeded, source-like radiometry)."""
    if adapter_class(name).source_replay == "none":
        return None
    return torch.rand(6, 5, size, size, generator=torch.Generator().manual_seed(7)) * 255


@pytest.mark.parametrize("arch", ARCH_IDS)
@pytest.mark.parametrize("name", available_adapters())
@pytest.mark.parametrize("batch", [1, 4])
def test_adapter_changes_only_declared_names_and_resets_exactly(name, batch, arch):
    model = toy_model(arch)
    size = tile_size(arch)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = create_adapter(name, model, source_tiles=_source_tiles(name, size))
    x = torch.rand(8, 5, size, size) * 200 + 30
    adapted = adapter.adapt(x[i : i + batch] for i in range(0, 8, batch))
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, source[k])}
    assert changed, "adaptation changed nothing"
    assert changed <= adapter.changed_names()
    # the model given to the adapter is never modified in place
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())


@pytest.mark.parametrize("arch", ARCH_IDS)
@pytest.mark.parametrize("name", available_adapters())
def test_adapter_state_round_trip(name, arch):
    model = toy_model(arch)
    size = tile_size(arch)
    a = create_adapter(name, model, source_tiles=_source_tiles(name, size))
    a.adapt([torch.rand(2, 5, size, size) * 255])
    b = create_adapter(name, model, source_tiles=_source_tiles(name, size))
    b.load_state_dict(a.state_dict())
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])


@pytest.mark.parametrize("name", [n for n in available_adapters() if adapter_class(n).source_replay == "required"])
def test_replay_methods_refuse_to_start_without_source_tiles(name):
    with pytest.raises(MissingSourceTilesError, match="source_tiles"):
        create_adapter(name, toy_model("unet"))


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="bn"):
        create_adapter("nope", UNet(UNetConfig(base_channels=4, depth=1)))


@pytest.mark.parametrize("name", available_adapters())
def test_models_without_batchnorm_adapt_their_groupnorm_affines_or_are_refused(name):
    from adapters.common import MethodNotApplicableError
    from tests.fakes.archs import groupnorm_model

    model = groupnorm_model()
    cls = adapter_class(name)
    if cls.needs_batchnorm:
        with pytest.raises(MethodNotApplicableError, match="no BatchNorm"):
            create_adapter(name, model, source_tiles=_source_tiles(name))
        return
    source = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = create_adapter(name, model, source_tiles=_source_tiles(name))
    adapted = adapter.adapt(torch.rand(2, 5, 32, 32) * 200 + 30 for _ in range(3))
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, source[k])}
    assert changed, f"{name} changed nothing on a GroupNorm model"
    assert changed <= adapter.changed_names()
