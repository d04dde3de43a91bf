"""Few-label adaptation: the L2-SP fine-tune, its held-out (leave-one-out / K-fold) evaluation, the job schedule.

The tiny world (a 64 px U-Net trained for 100 steps on synthetic D033, about 10 s) is shifted in D013 (gain and
haze): the source model scores about 0.12 mIoU there, so a few labelled D013 tiles have plenty to repair.
"""

import hashlib

import numpy as np
import pytest
import torch

import adapters.fewshot as fewshot
from adapters.buffer import BufferedTile
from adapters.fewshot import FewShotConfig, TooFewLabelsError, few_shot_adapt, l2sp_distance, run_few_shot
from terradapt.records import AdaptationJob, DriftEvent
from terradapt.training import evaluate
from tests.fakes.archs import ARCH_IDS, toy_model
from tests.fakes.world import make_world

FAST = FewShotConfig(steps=30)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return make_world()


def _labelled(samples, region="D013"):
    return [BufferedTile(f"{region}-{i:05d}", s.image, s.mask) for i, s in enumerate(samples)]


def _job(labels, region="D013"):
    trigger = DriftEvent(
        region=region, acquisition_id=labels[-1], tiles_seen=len(labels), signal="labels", score=1.0, threshold=1.0
    )
    return AdaptationJob(
        job_id=f"few-shot-{labels[-1]}",
        region=region,
        base_version=0,
        method="few-shot",
        tile_ids=(),
        trigger=trigger,
        labels=tuple(labels),
    )


def _miou(model, samples):
    return evaluate(model, [s.image for s in samples], [s.mask for s in samples]).miou


@pytest.mark.parametrize("k", [2, 4])
def test_few_shot_beats_the_source_on_a_covariate_shifted_region(world, k):
    held_out = world.shifted[20:40]
    labelled = world.shifted[:k]
    model = few_shot_adapt(world.model, [s.image for s in labelled], [s.mask for s in labelled], None, FAST, seed=0)
    assert _miou(model, held_out) > _miou(world.model, held_out) + 0.1


def test_a_bigger_l2sp_weight_keeps_the_weights_closer_to_the_source(world):
    images, masks = [s.image for s in world.shifted[:2]], [s.mask for s in world.shifted[:2]]
    distance = {}
    for weight in (0.0, 0.1, 10.0):
        model = few_shot_adapt(world.model, images, masks, None, FAST.model_copy(update={"l2sp": weight}))
        distance[weight] = l2sp_distance(model, world.model).item()
    assert distance[0.0] > distance[0.1] > distance[10.0] > 0.0
    assert l2sp_distance(world.model, world.model) == 0.0  # the anchor is the source itself


def test_held_out_evaluation_accepts_a_helpful_procedure_and_records_the_labels(world):
    tiles = _labelled(world.shifted[:3])
    unlabelled = [BufferedTile(f"D013-u{i}", s.image) for i, s in enumerate(world.shifted[3:7])]
    ids = [t.acquisition_id for t in tiles]
    out = run_few_shot(_job(ids), world.model, world.manifest, tiles, unlabelled, FAST, device="cpu")
    m = out.manifest
    assert out.gate.accepted and m.gate_accepted and m.method == "few-shot"
    assert m.labels_used == tuple(ids) and m.data_window == tuple(t.acquisition_id for t in unlabelled)
    assert m.gate_metrics["folds"] == 3.0  # leave-one-out
    assert m.gate_metrics["miou_candidate"] > m.gate_metrics["miou_current"]
    assert out.context.label_shift is not None and abs(sum(out.context.label_shift) - 1.0) < 1e-6  # measured mix


def test_held_out_evaluation_rejects_a_harmful_procedure(world):
    tiles = _labelled(world.shifted[:3])
    harmful = FewShotConfig(steps=10, lr=1.0, l2sp=0.0)  # a learning rate that wrecks the weights
    out = run_few_shot(
        _job([t.acquisition_id for t in tiles]), world.model, world.manifest, tiles, [], harmful, device="cpu"
    )
    assert not out.gate.accepted and not out.manifest.gate_accepted
    assert "held-out labelled mIoU drop" in out.manifest.gate_reasons[0]


def _key(image):
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize(("k", "max_folds"), [(3, 5), (7, 3)])
def test_no_fold_trains_on_the_tiles_it_is_scored_on(world, monkeypatch, k, max_folds):
    """Leave-one-out (3 labels) and K-fold (7 labels, 3 folds): checked on what each fine-tune actually received."""
    calls = []
    original = fewshot.few_shot_adapt

    def recording(source, images, masks, unlabelled, config, seed=0, device="cpu"):
        seen = {_key(im) for im in images} | {_key(t.numpy().astype(np.uint8)) for t in unlabelled or []}
        calls.append(({_key(im) for im in images}, seen))
        return original(source, images, masks, unlabelled, config.model_copy(update={"steps": 1}), seed, device)

    monkeypatch.setattr(fewshot, "few_shot_adapt", recording)
    tiles = _labelled(world.shifted[:k])
    unlabelled = [BufferedTile(t.acquisition_id, t.image) for t in tiles[:2]]  # a held-out image among them too
    config = FAST.model_copy(update={"max_folds": max_folds})
    out = run_few_shot(
        _job([t.acquisition_id for t in tiles]), world.model, world.manifest, tiles, unlabelled, config, device="cpu"
    )
    metrics = out.manifest.gate_metrics
    key_of = {t.acquisition_id: _key(t.image) for t in tiles}
    fold_of = {i: int(metrics[f"heldout_fold:{i}"]) for i in key_of}
    folds = sorted(set(fold_of.values()))
    assert len(folds) == min(k, max_folds) == metrics["folds"] and len(calls) == len(folds) + 1
    for (trained, seen), fold in zip(calls[:-1], folds, strict=True):
        held = {key_of[i] for i, f in fold_of.items() if f == fold}
        assert held and not held & seen  # neither its masks nor its images reached the fold's fine-tune
        assert trained == set(key_of.values()) - held
        assert metrics[f"fold{fold}_train_tiles"] == len(trained)
    assert calls[-1][0] == set(key_of.values())  # the shipped model trains on every label


def test_labels_the_current_version_trained_on_never_score_it(world):
    tiles = _labelled(world.shifted[:3])
    ids = [t.acquisition_id for t in tiles]
    quick = FAST.model_copy(update={"steps": 1})
    out = run_few_shot(_job(ids), world.model, world.manifest, tiles, [], quick, current_labels={ids[0]}, device="cpu")
    assert f"heldout_fold:{ids[0]}" not in out.manifest.gate_metrics and out.manifest.gate_metrics["folds"] == 2.0
    every = run_few_shot(
        _job(ids), world.model, world.manifest, tiles, [], quick, current_labels=set(ids), device="cpu"
    )
    assert not every.gate.accepted and "no held-out label" in every.gate.reasons[0]


def test_fewer_than_two_labels_is_a_typed_error(world):
    tiles = _labelled(world.shifted[:1])
    with pytest.raises(TooFewLabelsError, match="at least 2"):
        run_few_shot(_job(["D013-00000"]), world.model, world.manifest, tiles, [], FAST, device="cpu")


@pytest.mark.parametrize(
    ("settings", "due"),
    [
        ({}, [2, 4, 8, 16, 32]),
        ({"min_labels": 3}, [3, 6, 12, 24]),
        ({"refit_growth": 1.0}, list(range(2, 33))),
        ({"refit_growth": 1.5}, [2, 3, 5, 8, 12, 18, 27]),
    ],
)
def test_jobs_come_at_k_labels_then_each_time_the_count_has_grown_by_the_factor(settings, due):
    config = FewShotConfig(**settings)
    assert [n for n in range(33) if config.due(n)] == due


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_few_shot_fine_tunes_every_architecture(arch):
    model = toy_model(arch)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(5, 64, 64), dtype=np.uint8) for _ in range(2)]
    masks = [rng.integers(0, 4, size=(64, 64), dtype=np.uint8) for _ in range(2)]
    config = FewShotConfig(steps=2, crop=64, batch_size=2)
    tuned = few_shot_adapt(model, images, masks, None, config, seed=0, device="cpu")
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed and type(tuned) is type(model)
    x = torch.from_numpy(images[0][None]).float()
    assert tuned(x).shape == (1, 4, 64, 64)
