import copy

import numpy as np
import torch

from adapters.gate import Gate, GateConfig, GateContext, judge
from terradapt.model import UNet, UNetConfig


def _model():
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=5, num_classes=4, base_channels=4, depth=2)).eval()


def test_gate_rejects_a_model_collapsed_to_one_class():
    current = _model()
    collapsed = copy.deepcopy(current)
    with torch.no_grad():
        collapsed.classifier().bias[2] = 1e4  # every pixel -> class 2, entropy ~ 0
    tiles = torch.rand(4, 5, 32, 32) * 255
    result = Gate().check(collapsed, current, tiles)
    assert not result.accepted
    assert any("collapse" in r for r in result.reasons)
    assert result.metrics["max_class_share"] == 1.0


def test_gate_accepts_an_identical_candidate():
    current = _model()
    result = Gate().check(copy.deepcopy(current), current, torch.rand(2, 5, 32, 32) * 255)
    assert result.accepted, result.reasons
    assert result.metrics["agreement"] == 1.0


def test_big_change_toward_the_reference_mix_is_a_repair_not_a_jump():
    broken = [np.zeros((8, 8), np.uint8)] * 2  # current model says class 0 everywhere (collapsed on a shifted region)
    repaired = [np.arange(64, dtype=np.uint8).reshape(8, 8) % 4] * 2
    cfg = GateConfig(max_class_share=1.0)
    without = judge(repaired, [1.0, 1.0], broken, [1.2, 1.2], 4, cfg)
    assert not without.accepted  # a jump with nothing to compare it to
    with_ref = judge(repaired, [1.0, 1.0], broken, [1.2, 1.2], 4, cfg, context=GateContext(label_shift=(0.25,) * 4))
    assert with_ref.accepted, with_ref.reasons
    # without an estimate, the source prior only waives the jump when the current mix is implausible (broken)
    assert judge(repaired, [1.0, 1.0], broken, [1.2, 1.2], 4, cfg, context=GateContext(prior=(0.25,) * 4)).accepted


def test_moving_toward_the_source_prior_is_not_enough_under_label_shift():
    """A water-rich region predicted right (current) vs a candidate pulled back to the source mix: rejected."""
    current = [np.array([[0, 0, 0, 1]] * 4, np.uint8)] * 2  # 75% class 0: plausible, TV 0.5 from the prior below
    candidate = [np.array([[0, 1, 2, 3]] * 4, np.uint8)] * 2  # back to the uniform source mix
    result = judge(candidate, [1.0, 1.0], current, [1.0, 1.0], 4, GateConfig(), context=GateContext(prior=(0.25,) * 4))
    assert not result.accepted
    assert any("jump" in r or "agreement" in r for r in result.reasons)


def test_labelled_check_rejects_a_worse_candidate():
    truth = [np.ones((8, 8), np.uint8)]
    good, bad = [np.ones((8, 8), np.uint8)], [np.zeros((8, 8), np.uint8)]
    result = judge(bad, [0.5], good, [0.5], 2, GateConfig(min_agreement=0.0, max_class_tv=1.0), masks=truth)
    assert not result.accepted
    assert any("mIoU" in r for r in result.reasons)


def test_a_label_shift_estimate_far_from_the_prior_is_not_trusted():
    """BBSE on a source model broken by covariate shift echoes its collapse: the gate falls back to the prior."""
    broken = [np.zeros((8, 8), np.uint8)] * 2  # collapsed on class 0
    repaired = [np.arange(64, dtype=np.uint8).reshape(8, 8) % 4] * 2
    cfg = GateConfig(max_class_share=1.0)
    echo = [0.97, 0.01, 0.01, 0.01]  # the estimate repeats the collapse: TV 0.72 from the uniform prior
    result = judge(
        repaired,
        [1.0, 1.0],
        broken,
        [1.2, 1.2],
        4,
        cfg,
        context=GateContext(label_shift=tuple(echo), prior=(0.25,) * 4),
    )
    assert result.metrics["tv_reference_to_prior"] > cfg.broken_tv
    assert "tv_candidate_to_reference" not in result.metrics  # not used
    assert result.accepted, result.reasons  # the prior's broken-model waiver applies
    # a plausible estimate (within broken_tv of the prior) is the reference: on a label-shifted region predicted
    # right, a candidate pulled back to the source mix moves away from it, and nothing waives the jump
    current = [np.array([[0, 0, 0, 1]] * 4, np.uint8)] * 2  # 75% class 0
    uniform = [np.array([[0, 1, 2, 3]] * 4, np.uint8)] * 2
    plausible = [0.7, 0.1, 0.1, 0.1]
    result = judge(
        uniform,
        [1.0, 1.0],
        current,
        [1.0, 1.0],
        4,
        GateConfig(),
        context=GateContext(label_shift=tuple(plausible), prior=(0.25,) * 4),
    )
    assert result.metrics["tv_candidate_to_reference"] > result.metrics["tv_current_to_reference"]
    assert not result.accepted
    assert any("jump" in r for r in result.reasons)


def test_covariate_evidence_lets_a_move_toward_the_prior_through():
    """Under covariate shift the current predictions are what changed: moving back toward the prior is a repair."""
    current = [np.array([[0, 0, 0, 1]] * 4, np.uint8)] * 2  # 75% class 0, TV 0.5 from the prior: not "broken"
    candidate = [np.array([[0, 1, 2, 3]] * 4, np.uint8)] * 2
    args = (candidate, [1.0, 1.0], current, [1.0, 1.0], 4, GateConfig())
    assert not judge(*args, context=GateContext(prior=(0.25,) * 4)).accepted  # no covariate evidence: rejected
    assert judge(*args, context=GateContext(prior=(0.25,) * 4, covariate=True)).accepted
