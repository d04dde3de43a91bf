"""Label-free model selection: the estimator, its calibration, and the gate that ships only what it says helps.

A tiny U-Net is trained for 100 steps on 64 px synthetic D033 + D040 tiles; the selection is calibrated on held-out
tiles of both departements (two areas, class-tilted draws, a few tuning shifts).
"""

import numpy as np
import pytest
import torch

from adapters.buffer import BufferedTile
from adapters.config import AdaptationConfig
from adapters.gate import GateConfig, GateContext, judge
from adapters.policy import run_adaptation
from adapters.selection import SelectionConfig, SelectionDomain, Selector
from adapters.selection_calibration import TUNING_SHIFTS, calibrate_selection, class_mix_subsets
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.model import UNetConfig
from terradapt.records import AdaptationJob, DriftEvent
from terradapt.training import TrainConfig, evaluate, train_source_checkpoint

FEATS = ("confidence_gain", "entropy_gain", "disagreement", "toward_reference", "toward_prior", "current_confidence")


def _domain(gain: float, method: str = "bn-balanced", **feats: float) -> SelectionDomain:
    values = dict.fromkeys(FEATS, 0.0) | feats
    return SelectionDomain(shift="s", subset="a", method=method, features=values, gain=gain)


def test_selector_learns_a_linear_relation_and_the_margin_follows_its_quantile():
    rng = np.random.default_rng(0)
    doms = []
    for _ in range(60):
        c = float(rng.normal())
        doms.append(_domain(0.1 * c + float(rng.normal(0, 0.01)), confidence_gain=c, disagreement=float(rng.random())))
    sel = Selector(doms, SelectionConfig(ridge=0.0, margin_quantile=0.5))
    up = sel.estimate("bn-balanced", dict.fromkeys(FEATS, 0.0) | {"confidence_gain": 1.0, "disagreement": 0.5})
    down = sel.estimate("bn-balanced", dict.fromkeys(FEATS, 0.0) | {"confidence_gain": -1.0, "disagreement": 0.5})
    assert up.gain == pytest.approx(0.1, abs=0.01) and down.gain == pytest.approx(-0.1, abs=0.01)
    assert up.ships and not down.ships
    strict = Selector(doms, SelectionConfig(ridge=0.0, margin_quantile=0.99))
    assert strict.estimate("bn-balanced", dict.fromkeys(FEATS, 0.0)).margin > up.margin
    # a method without domains of its own gets the pooled fit; too few rows or disabled: no selector
    assert sel.estimate("tent", dict.fromkeys(FEATS, 0.0)).margin == up.margin
    rows = [d.model_dump() for d in doms]
    assert Selector.from_rows(rows, SelectionConfig(enabled=False)) is None
    assert Selector.from_rows(rows[:3]) is None
    with pytest.raises(ValueError, match="selection domains"):
        Selector(doms[:3])


def test_gate_with_a_selector_decides_by_the_estimate_not_the_class_mix_heuristics():
    doms = [_domain(0.1 * c, confidence_gain=c) for c in np.linspace(-1, 1, 21)]
    sel = Selector(doms, SelectionConfig(ridge=0.0, margin_quantile=0.5))
    current = [np.zeros((8, 8), dtype=np.uint8)]
    changed = [np.ones((8, 8), dtype=np.uint8)]  # a full class-mix jump, no agreement
    args = (changed, [0.5], current, [0.5], 2, GateConfig())
    assert not judge(*args, candidate_confidence=[0.9], current_confidence=[0.5]).accepted  # heuristics alone
    ctx = GateContext(selector=sel, method="bn-balanced")
    helps = judge(*args, context=ctx, candidate_confidence=[0.9], current_confidence=[0.5])
    assert helps.accepted and helps.metrics["estimated_gain"] > helps.metrics["estimate_margin"]
    hurts = judge(*args, context=ctx, candidate_confidence=[0.1], current_confidence=[0.5])
    assert not hurts.accepted and "estimated mIoU change" in hurts.reasons[0]
    both = judge(
        changed,
        [0.5],
        current,
        [0.5],
        2,
        GateConfig(use_heuristics=True),
        ctx,
        candidate_confidence=[0.9],
        current_confidence=[0.5],
    )
    assert not both.accepted and any("class distribution jump" in r for r in both.reasons)


def test_class_mix_subsets_keep_every_area_and_tilt_toward_classes():
    rng = np.random.default_rng(0)
    masks = [np.full((4, 4), i % 3, dtype=np.uint8) for i in range(12)]
    subsets = class_mix_subsets(masks, ["a"] * 6 + ["b"] * 6, 3, 4, rng)
    assert set(subsets) == {"area-a", "area-b", "tilt-0", "tilt-1", "tilt-2"}
    assert len(class_mix_subsets(masks, ["a"] * 12, 3, 4, rng, max_tilts=1)) == 2  # one area, one tilt
    assert all(i < 6 for i in subsets["area-a"]) and all(i >= 6 for i in subsets["area-b"])
    assert all(len(v) == 4 for v in subsets.values())


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    ds = SyntheticDataset({"D033": 40, "D040": 24, "D029": 16, "D013": 16}, size=64, seed=0)
    src = [ds.load(r, i) for r in ("D033", "D040") for i in ds.tile_ids(r)]
    rng = np.random.default_rng(0)
    src = [src[i] for i in rng.permutation(len(src))]
    train, cal = src[:32], src[32:]
    model, manifest = train_source_checkpoint(
        [s.image for s in train],
        [s.mask for s in train if s.mask is not None],
        UNetConfig(in_channels=5, num_classes=13, base_channels=8, depth=2),
        TrainConfig(steps=100, batch_size=8, crop=64, lr=1e-2, seed=0, device="cpu"),
        classes=ds.classes,
        bands=ds.band_names,
        regions=("D033", "D040"),
    )
    shifts = {k: TUNING_SHIFTS[k] for k in ("none", "darker", "haze", "warm-cast")}
    domains = calibrate_selection(
        model,
        manifest,
        [s.image for s in cal],
        [s.mask for s in cal if s.mask is not None],
        [s.region for s in cal],
        methods=("bn", "bn-balanced"),
        shifts=shifts,
        tiles_per_domain=8,
    )
    return {"model": model, "manifest": manifest, "domains": domains, "ds": ds}


def test_calibration_measures_every_shift_and_class_mix_with_labels(toy):
    domains = toy["domains"]
    assert {d.shift for d in domains} == {"none", "darker", "haze", "warm-cast"}
    assert {"area-D033", "area-D040"} <= {d.subset for d in domains}
    assert all(-1.0 <= d.gain <= 1.0 and set(d.features) == set(FEATS) for d in domains)
    gains: dict[str, list[float]] = {d.shift: [] for d in domains}
    for d in domains:
        gains[d.shift].append(d.gain)
    assert np.mean(gains["darker"]) > np.mean(gains["none"])  # adaptation repairs a shift, not its absence


def test_mixed_shift_toy_old_gate_ships_damage_the_selection_does_not(toy):
    """D029 (label shift only) with covariate evidence from a late false alarm: the case that cost 29 mIoU.

    The old default (``bn`` judged by the class-mix heuristics, which covariate evidence waives once the
    candidate moves toward the source prior) ships a version worse than the source on the region's held-out
    labelled tiles; the new default (``bn-balanced`` judged by the calibrated selection) does not.
    """
    ds = SyntheticDataset({"D033": 40, "D040": 24, "D029": 24}, size=64, seed=0)
    samples = [ds.load("D029", i) for i in ds.tile_ids("D029")]
    stream, held = [s.image for s in samples[:12]], [s.image for s in samples[12:]]
    held_masks = [s.mask for s in samples[12:] if s.mask is not None]
    tiles = [BufferedTile(f"D029-{i}", im) for i, im in enumerate(stream)]
    drift = DriftEvent(
        region="D029",
        acquisition_id="D029-11",
        tiles_seen=12,
        signal="radiometry",
        score=3,
        threshold=1,
        covariate=True,
    )
    job = AdaptationJob(job_id="j", region="D029", base_version=0, method="bn", tile_ids=("x",), trigger=drift)
    prior = toy["manifest"].class_prior
    before = evaluate(toy["model"], held, held_masks).miou

    old_config = AdaptationConfig(method="bn", device="cpu")
    old_context = GateContext(prior=prior, covariate=True)
    old = run_adaptation(job, toy["model"], toy["manifest"], tiles, old_config, context=old_context)
    assert old.gate.accepted and evaluate(old.model, held, held_masks).miou < before - 0.01  # damage shipped

    new_config = AdaptationConfig(device="cpu")  # the default method
    new_context = GateContext(prior=prior, covariate=True, selector=Selector(toy["domains"]), method=new_config.method)
    new = run_adaptation(job, toy["model"], toy["manifest"], tiles, new_config, context=new_context)
    assert new.manifest.method == "bn-balanced" and "estimated_gain" in new.gate.metrics
    assert not new.gate.accepted or evaluate(new.model, held, held_masks).miou >= before - 0.005
