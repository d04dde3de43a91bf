"""The typer CLI on a tiny FLAIR-layout dataset written by the generator: generate, train, evaluate, adapt."""

import pytest
from typer.testing import CliRunner

from stream.cli import app
from terradapt.datasets.flair import FlairDataset

runner = CliRunner(env={"COLUMNS": "250"})


def test_info_lists_methods_and_detectors():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "bn" in result.output and "tent" in result.output and "mean-shift" in result.output


def test_generate_train_evaluate_adapt(tmp_path):
    data = tmp_path / "flair"
    r = runner.invoke(app, ["generate", str(data), "--regions", "D033,D013", "--tiles", "3", "--size", "64"])
    assert r.exit_code == 0, r.output
    ds = FlairDataset(data)
    assert ds.regions() == ["D013", "D033"]
    model = tmp_path / "model"
    r = runner.invoke(
        app,
        [
            "train",
            str(data),
            "--out",
            str(model),
            "--regions",
            "D033",
            "--steps",
            "3",
            "--base-channels",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (model / "weights.safetensors").exists() and (model / "manifest.json").exists()
    r = runner.invoke(app, ["evaluate", str(data), "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert "D013" in r.output and "mIoU" in r.output
    r = runner.invoke(
        app,
        [
            "adapt",
            str(data),
            "--region",
            "D013",
            "--model",
            str(model),
            "--method",
            "tent",
            "--out",
            str(tmp_path / "adapted"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "gate:" in r.output
    assert (tmp_path / "adapted" / "manifest.json").exists()


def test_unknown_method_is_rejected_with_the_valid_names(tmp_path):
    r = runner.invoke(app, ["adapt", str(tmp_path), "--region", "D013", "--method", "nope"])
    assert r.exit_code != 0
    assert "bn" in str(r.exception) or "bn" in r.output


def test_train_the_flair_baseline_preset_and_refuse_a_bad_arch(tmp_path):
    from terradapt.architectures import FLAIR_MEAN
    from terradapt.checkpoint import load_checkpoint

    data = tmp_path / "flair"
    assert (
        runner.invoke(app, ["generate", str(data), "--regions", "D033", "--tiles", "4", "--size", "64"]).exit_code == 0
    )
    out = tmp_path / "flair-baseline"
    r = runner.invoke(app, ["train", str(data), "--arch", "flair-baseline", "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    model, manifest = load_checkpoint(out)
    assert manifest.architecture == "smp" and manifest.config["encoder"] == "resnet34"
    assert manifest.input_mean == pytest.approx(FLAIR_MEAN)  # the preset's normalisation, not the data's
    assert len(manifest.class_band_mean) == 13 and model(model.input_mean.new_zeros(1, 5, 64, 64)).shape[1] == 13
    r = runner.invoke(app, ["train", str(data), "--arch", "vit-huge", "--steps", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "smp:<Arch>:<encoder>" in r.output
