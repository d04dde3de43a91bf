"""Source-training protocols, radiometric augmentation, the held-out calibration split and the train CLI.

Toy protocol (a few seconds per protocol on one core): a U-Net (base 8, depth 2) trained for 60 steps on 24
synthetic 48 px tiles of two source departements (D033, D040 as domains). The checks are about direction (the
loss falls, the model beats predicting the majority class everywhere), not final accuracy.
"""

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from monitoring.calibration import RECOMMENDED_TILES
from stream.cli import app
from terradapt.augment import RadiometricAugmentConfig, Range, radiometric_augment
from terradapt.checkpoint import load_checkpoint, save_checkpoint
from terradapt.classes import IGNORE_INDEX
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.errors import InvalidTileError, UnknownNameError
from terradapt.model import UNetConfig
from terradapt.protocols import available_protocols, create_protocol, get_protocol, irm_penalty
from terradapt.training import TrainConfig, holdout_split, predict_maps, train_source_checkpoint, train_source_model

runner = CliRunner(env={"COLUMNS": "250"})
CLASSES, BANDS = tuple(f"class{i}" for i in range(13)), ("R", "G", "B", "NIR", "DSM")
TINY = UNetConfig(in_channels=5, num_classes=13, base_channels=8, depth=2)
#: configs that make each protocol's own mechanism act within the toy budget (IRM's penalty switches on)
TOY_CONFIGS: dict[str, dict[str, Any]] = {
    "irm": {"anneal_steps": 40, "penalty_weight": 2.0},
    "reptile": {"inner_steps": 5},
}


@pytest.fixture(scope="module")
def source():
    torch.set_num_threads(1)
    ds = SyntheticDataset({"D033": 12, "D040": 12}, size=48, seed=0)
    samples = [ds.load(r, t) for r in ds.regions() for t in ds.tile_ids(r)]
    masks = []
    for s in samples:
        assert s.mask is not None
        masks.append(s.mask)
    return {
        "images": [s.image for s in samples],
        "masks": masks,
        "domains": [s.region for s in samples],
        "ids": [f"{s.region}/{s.tile_id}" for s in samples],
    }


def test_registry_lists_the_four_protocols():
    assert available_protocols() == ["erm", "erm-aug", "irm", "reptile"]
    assert all(get_protocol(n).name == n for n in available_protocols())


@pytest.mark.parametrize("name", available_protocols())
def test_protocol_trains_a_model_that_beats_the_majority_class(source, name):
    losses: list[float] = []
    model = train_source_model(
        source["images"],
        source["masks"],
        TINY,
        TrainConfig(steps=60, batch_size=8, crop=48, lr=1e-2, seed=0, device="cpu"),
        lambda _, loss: losses.append(loss),
        protocol=name,
        protocol_config=TOY_CONFIGS.get(name),
        domains=source["domains"],
    )
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    truth = np.concatenate([m.ravel() for m in source["masks"]])
    majority = np.bincount(truth).max() / truth.size
    accuracy = np.mean(np.concatenate([p.ravel() for p in predict_maps(model, source["images"])]) == truth)
    assert accuracy > majority + 0.05, f"{name}: accuracy {accuracy:.3f}, majority class {majority:.3f}"


def test_erm_is_the_default_and_ignores_domains(source):
    cfg = TrainConfig(steps=3, batch_size=4, crop=32, seed=1, device="cpu")
    default = train_source_model(source["images"], source["masks"], TINY, cfg)
    explicit = train_source_model(
        source["images"], source["masks"], TINY, cfg, protocol="erm", protocol_config={}, domains=source["domains"]
    )
    for k, v in default.state_dict().items():
        assert torch.equal(v, explicit.state_dict()[k]), k


def test_unknown_protocol_or_config_key_is_refused_listing_what_is_accepted(source):
    with pytest.raises(UnknownNameError, match="erm-aug") as err:
        get_protocol("maml")
    assert set(available_protocols()) <= set(err.value.available)
    with pytest.raises(UnknownNameError, match="irm"):
        train_source_model(source["images"], source["masks"], TINY, TrainConfig(steps=1), protocol="nope")
    with pytest.raises(ValidationError, match="penalty"):
        create_protocol("irm", {"penalty": 3.0})
    with pytest.raises(ValueError, match="domains"):
        train_source_model(source["images"], source["masks"], TINY, TrainConfig(steps=1), domains=["D033"])


def test_irm_penalty_is_zero_for_constant_logits_and_matches_the_analytic_binary_case():
    target = torch.randint(0, 3, (2, 4, 4))
    constant = torch.full((2, 3, 4, 4), 0.7, requires_grad=True)
    assert irm_penalty(constant, target).item() == pytest.approx(0.0, abs=1e-12)
    # one pixel, logits (a, 0), label 0: d/ds CE(s * z) at s = 1 is -(1 - sigmoid(a)) * a
    a = 2.0
    logits = torch.tensor([a, 0.0]).view(1, 2, 1, 1).requires_grad_(True)
    penalty = irm_penalty(logits, torch.zeros(1, 1, 1, dtype=torch.long))
    expected = ((1 - 1 / (1 + math.exp(-a))) * a) ** 2
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    penalty.backward()  # differentiable: the training objective back-propagates through it
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # a domain whose pixels are all unlabelled adds nothing (and no NaN)
    ignored = torch.full((1, 1, 1), IGNORE_INDEX, dtype=torch.long)
    assert irm_penalty(logits, ignored).item() == 0.0


def test_radiometric_augment_is_seeded_uint8_and_changes_only_optical_bands(source):
    image = source["images"][0]
    before = image.copy()
    always = RadiometricAugmentConfig(
        haze=Range(p=1, low=0.2, high=0.4),
        blur=Range(p=1, low=0.5, high=1.0),
        gain=Range(p=1, low=0.0, high=5.0),
        offset=Range(p=1, low=-300, high=300),
        gamma=Range(p=1, low=0.3, high=3.0),
        noise=Range(p=1, low=5, high=50),
    )
    a = radiometric_augment(image, np.random.default_rng(3), always)
    b = radiometric_augment(image, np.random.default_rng(3), always)
    c = radiometric_augment(image, np.random.default_rng(4), always)
    assert a.dtype == np.uint8 and a.shape == image.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a[:4].astype(int) - image[:4]).mean() > 5
    assert np.array_equal(a[4], image[4])  # the elevation band is not radiometry
    assert np.array_equal(image, before)  # the input is left alone
    assert not np.array_equal(radiometric_augment(image, np.random.default_rng(0)), image)  # the defaults act too
    off = Range(p=0, low=1, high=1)
    never = RadiometricAugmentConfig(haze=off, blur=off, gain=off, offset=off, gamma=off, noise=off)
    assert np.array_equal(radiometric_augment(image, np.random.default_rng(0), never), image)
    with pytest.raises(InvalidTileError, match="uint8"):
        radiometric_augment(image.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValidationError, match="low"):
        Range(p=0.5, low=2.0, high=1.0)
    with pytest.raises(ValidationError):
        RadiometricAugmentConfig.model_validate({"hue": {"p": 1, "low": 0, "high": 1}})


def test_holdout_split_is_seeded_per_region_and_keeps_training_tiles():
    regions = ["D033"] * 10 + ["D040"] * 6 + ["D029"]
    train, held = holdout_split(regions, 0.5, seed=0)
    assert sorted(train + held) == list(range(len(regions))) and not set(train) & set(held)
    assert [sum(regions[i] == r for i in held) for r in ("D033", "D040", "D029")] == [5, 3, 0]
    assert holdout_split(regions, 0.5, seed=0) == (train, held)
    assert holdout_split(regions, 0.5, seed=1) != (train, held)
    # adding a region does not move another region's split
    _, held_d033 = holdout_split(regions[:10], 0.5, seed=0)
    assert [i for i in held if i < 10] == held_d033
    assert holdout_split(regions, 0.0) == (list(range(len(regions))), [])
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(regions, 1.0)


def test_manifest_records_protocol_and_held_out_calibration_tiles(source, tmp_path):
    train, held = holdout_split(source["domains"], 0.5, seed=0)
    pick = lambda key, idx: [source[key][i] for i in idx]  # noqa: E731
    model, manifest = train_source_checkpoint(
        pick("images", train),
        pick("masks", train),
        TINY,
        TrainConfig(steps=2, batch_size=2, crop=32, device="cpu"),
        tile_ids=pick("ids", train),
        protocol="erm-aug",
        domains=pick("domains", train),
        calibration_tiles=pick("ids", held),
        classes=CLASSES,
        bands=BANDS,
        regions=("D033", "D040"),
    )
    save_checkpoint(tmp_path / "ck", model, manifest)
    _, loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.protocol == "erm-aug"
    assert len(loaded.calibration_tiles) == 12 and not set(loaded.calibration_tiles) & set(loaded.training_tiles)
    with pytest.raises(ValueError, match="also training tiles"):
        train_source_checkpoint(
            source["images"],
            source["masks"],
            TINY,
            TrainConfig(steps=1),
            tile_ids=source["ids"],
            calibration_tiles=source["ids"][:1],
            classes=CLASSES,
            bands=BANDS,
            regions=("D033",),
        )


def test_cli_train_holds_out_calibration_tiles_and_registry_init_uses_them(tmp_path, monkeypatch):
    data, model = tmp_path / "flair", tmp_path / "model"
    r = runner.invoke(app, ["generate", str(data), "--regions", "D033,D040", "--tiles", "4", "--size", "32"])
    assert r.exit_code == 0, r.output
    args = ["train", str(data), "--out", str(model), "--steps", "3", "--base-channels", "4"]
    r = runner.invoke(app, [*args, "--protocol", "erm-aug", "--calibration-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["protocol"] == "erm-aug"
    assert len(manifest["calibration_tiles"]) == 4 and len(manifest["training_tiles"]) == 4
    assert not set(manifest["calibration_tiles"]) & set(manifest["training_tiles"])
    assert {t.split("/")[0] for t in manifest["calibration_tiles"]} == {"D033", "D040"}
    assert "4 held out" in r.output and "warning" in r.output

    r = runner.invoke(app, [*args, "--protocol", "maml"])
    assert r.exit_code != 0 and "erm-aug" in r.output and "reptile" in r.output
    r = runner.invoke(app, [*args, "--protocol", "irm", "--protocol-config", '{"penalty": 1}'])
    assert r.exit_code != 0 and "penalty" in r.output

    # registry-init against a folder store instead of MinIO: it calibrates on exactly the held-out tiles
    import serving.minio_store
    from serving.store import FileSystemStore

    monkeypatch.setattr(serving.minio_store, "minio_client", lambda _config: None)
    monkeypatch.setattr(serving.minio_store, "MinioStore", lambda _client, _bucket: FileSystemStore(tmp_path / "s3"))
    monkeypatch.delenv("TERRADAPT_CONFIG", raising=False)
    r = runner.invoke(app, ["registry-init", "--model", str(model), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert "held-out tiles" in r.output and f"{RECOMMENDED_TILES} or more" in r.output
    stored = json.loads((tmp_path / "s3" / "models" / "source" / "0" / "calibration.json").read_text())
    assert sorted(stored["tile_ids"]) == sorted(manifest["calibration_tiles"])
    # every tile on purpose: the training tiles among them are refused
    r = runner.invoke(app, ["registry-init", "--model", str(model), "--data", str(data), "--all-tiles"])
    assert r.exit_code != 0 and "calibrate on held-out source tiles" in r.output
