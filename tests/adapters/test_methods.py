"""Every registered method must improve a seeded covariate shift; the reset policy must act on its signals.

Toy protocol (about 10 s on 2 cores): a tiny U-Net (base 8, depth 2) is trained for 100 steps on 24 synthetic
64 px tiles of D033, then adapted on 16 tiles of D013 (per-band gain/offset + haze + sun: a strong covariate
shift with the source labels) and evaluated on 8 other D013 tiles. 100 steps give a weak source model (about
0.29 mIoU in domain, 0.12 on D013): the test checks the direction of every method, not its final accuracy.
Methods that replay source tiles get 8 D033 tiles.
"""

import copy

import numpy as np
import numpy.typing as npt
import pytest
import torch

from adapters.common import PooledBNStats
from adapters.config import ResetConfig
from adapters.gate import Gate
from adapters.policy import ResetPolicy, adapt_with_resets, class_drift
from adapters.registry import adapter_class, available_adapters, create_adapter
from terradapt.datasets.base import Sample
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.model import UNet, UNetConfig
from terradapt.training import TrainConfig, evaluate, train_source_model


def _masks(samples: list[Sample]) -> list[npt.NDArray[np.uint8]]:
    """The label masks of labelled samples (the synthetic set labels every tile)."""
    masks = []
    for s in samples:
        assert s.mask is not None
        masks.append(s.mask)
    return masks


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    ds = SyntheticDataset({"D033": 24, "D013": 24}, size=64, seed=0)
    src = [ds.load("D033", i) for i in ds.tile_ids("D033")]
    tgt = [ds.load("D013", i) for i in ds.tile_ids("D013")]
    tgt = [tgt[i] for i in np.random.default_rng(0).permutation(len(tgt))]  # mix zones between the splits
    model = train_source_model(
        [s.image for s in src],
        _masks(src),
        UNetConfig(in_channels=5, num_classes=13, base_channels=8, depth=2),
        TrainConfig(steps=100, batch_size=8, crop=64, lr=1e-2, seed=0, device="cpu"),
    )
    masks = _masks(src)
    prior = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=256)[:13].astype(np.float64)
    return {
        "model": model,
        "prior": torch.tensor(prior / prior.sum(), dtype=torch.float32),
        "stream": torch.from_numpy(np.stack([s.image for s in tgt[:16]])).float(),
        "images": [s.image for s in tgt[16:]],
        "masks": [s.mask for s in tgt[16:]],
        "source_tiles": torch.from_numpy(np.stack([s.image for s in src[:8]])).float(),
    }


#: methods that act on label shift only (output priors): a covariate shift is not theirs to repair
LABEL_SHIFT_ONLY = {"prior-em"}


@pytest.mark.parametrize("name", sorted(set(available_adapters()) - LABEL_SHIFT_ONLY))
@pytest.mark.parametrize("batch", [1, 4])
def test_method_improves_a_covariate_shift(toy, name, batch):
    before = evaluate(toy["model"], toy["images"], toy["masks"]).miou
    torch.manual_seed(0)
    tiles = toy["source_tiles"] if adapter_class(name).source_replay != "none" else None
    adapter = create_adapter(name, toy["model"], source_tiles=tiles, class_prior=toy["prior"])
    stream = toy["stream"]
    adapted = adapter.adapt(stream[i : i + batch] for i in range(0, len(stream), batch))
    after = evaluate(adapted, toy["images"], toy["masks"]).miou
    assert after >= before + 0.05, f"{name}: {before:.3f} -> {after:.3f}"


def test_eata_with_source_fisher_improves_too(toy):
    before = evaluate(toy["model"], toy["images"], toy["masks"]).miou
    adapter = create_adapter("eata", toy["model"], source_tiles=toy["source_tiles"])
    assert adapter_class("eata").source_replay == "optional"
    adapted = adapter.adapt(toy["stream"].split(2))
    assert evaluate(adapted, toy["images"], toy["masks"]).miou >= before + 0.05


def test_gate_rejects_a_collapsed_adaptation(toy):
    """TENT with an absurd learning rate and many steps: the gate must refuse what it produces."""
    adapter = create_adapter("tent", toy["model"], {"lr": 1.0, "steps": 20})
    collapsed = adapter.adapt(toy["stream"].split(4))
    result = Gate().check(collapsed, toy["model"], toy["stream"][:8])
    assert not result.accepted, result.metrics


def test_reset_policy_needs_a_sustained_signal_and_can_be_periodic():
    policy = ResetPolicy(ResetConfig(threshold=0.2, patience=3))
    assert [policy.update(s) for s in (0.5, 0.5, 0.1, 0.5, 0.5)] == [False] * 5  # interrupted: no reset
    assert policy.update(0.5) is True
    state = policy.state_dict()
    clone = ResetPolicy(ResetConfig(threshold=0.2, patience=3))
    clone.load_state_dict(state)
    assert clone.state_dict() == state
    periodic = ResetPolicy(ResetConfig(threshold=1.0, period=4))
    assert [periodic.update(0.0) for _ in range(8)] == [False, False, False, True] * 2


def test_reset_policy_brings_a_collapsing_adapter_back_to_source(toy):
    source: UNet = toy["model"]
    reference = torch.full((13,), 1 / 13)
    adapter = create_adapter("tent", source, {"lr": 1.0, "steps": 20})
    policy = ResetPolicy(ResetConfig(threshold=0.05, patience=2))
    adapt_with_resets(adapter, toy["stream"].split(2), policy, copy.deepcopy(source), reference)
    assert policy.resets >= 1
    assert class_drift(source, source, toy["stream"][:2], reference) == 0.0


def test_pooled_statistics_do_not_depend_on_the_batch_size():
    """Batch-1 streams must deploy the variance over all pixels, between-tile variation included."""
    x = torch.randn(4, 3, 8, 8) + torch.arange(4.0).view(4, 1, 1, 1) * 3  # tiles with very different means
    bn = torch.nn.BatchNorm2d(3, momentum=None).train()
    pooled = PooledBNStats(bn)
    for tile in x.split(1):
        bn(tile)
    pooled.write()
    assert bn.running_mean is not None and bn.running_var is not None
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.transpose(0, 1).reshape(3, -1).var(dim=1), atol=1e-4)
    pooled.remove()
    assert not bn._forward_pre_hooks
