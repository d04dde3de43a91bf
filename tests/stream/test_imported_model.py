"""A user's FLAIR-baseline checkpoint, imported, streams through the embedded runner (the demo's loop).

Random weights with warmed-up BatchNorm statistics stand for the user's trained model: what is checked is that
every stage runs on the imported architecture (calibration, prediction, features, monitor, adaptation, gate,
registry), not the accuracy of an untrained network.
"""

from __future__ import annotations

from typer.testing import CliRunner

from stream.cli import app
from stream.config import Settings
from stream.demo import run_stream
from stream.scenarios import scenario
from terradapt.checkpoint import load_checkpoint
from tests.fakes.archs import user_flair_checkpoint


def test_imported_flair_baseline_streams_through_the_embedded_runner(tmp_path):
    user_flair_checkpoint(tmp_path / "flair.ckpt")
    out = tmp_path / "imported"
    result = CliRunner().invoke(
        app, ["import-model", str(tmp_path / "flair.ckpt"), "--arch", "flair-baseline", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    model, manifest = load_checkpoint(out)
    assert manifest.class_band_mean == ()  # the class look comes from labelled calibration tiles
    settings = Settings.model_validate(
        {
            "demo": {
                "workdir": tmp_path / "work",
                "cache_dir": tmp_path / "cache",
                "report_dir": tmp_path / "report",
                "tile_size": 64,
                "train_tiles": 4,
                "calibration_tiles": 24,
                "stream_tiles": 10,
                "eval_tiles": 1,
                "arch": "flair-baseline",
            },
            "runtime": {"device": "cpu"},
            "adaptation": {"device": "cpu", "gate": {"selection": {"enabled": False}}},
        }
    )
    sc = scenario(settings.demo)
    rows, run, registry = run_stream(settings, sc, model, manifest)
    streamed = sum(len(v) for v in sc.streams.values())
    assert len(run.predictions) == streamed and not run.dead_letters
    source = registry.manifest("source", 0)
    assert source.architecture == "smp" and source.config["encoder"] == "resnet34"
    assert len(source.class_band_mean) == 13 and len(source.class_prior) == 13  # measured at bootstrap
    # any version the loop made is the same architecture, with the same normalisation
    for v in [v for v in run.adaptations if v.accepted]:
        m = registry.manifest(v.region, v.version)
        assert m.architecture == "smp" and m.input_mean == source.input_mean
    assert {r.region for r in rows} == set(sc.streams)
