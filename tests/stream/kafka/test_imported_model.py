"""A user's imported FLAIR-baseline model streamed by the Kafka workers on the real broker and MinIO.

The stream worker loads the smp network from the MinIO registry (architecture and normalisation from the
manifest), predicts every acquisition once and writes its prediction object; on a shifted departement the
adaptation worker adapts and gates the same network. The test waits on topics, never on time.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from stream.cli import app
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest
from terradapt.datasets.synthetic import SyntheticDataset
from tests.fakes.archs import user_flair_checkpoint
from tests.stream.kafka.stack import Stack, prediction_keys

pytestmark = pytest.mark.services


def test_imported_flair_baseline_is_streamed_by_the_kafka_worker(tmp_path, tiles):
    user_flair_checkpoint(tmp_path / "flair.ckpt")
    out = tmp_path / "imported"
    result = CliRunner().invoke(
        app, ["import-model", str(tmp_path / "flair.ckpt"), "--arch", "flair-baseline", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    stack = Stack(tmp_path / "stack")
    stack.root.mkdir(parents=True, exist_ok=True)
    try:
        # what `terradapt registry-init` does: publish + calibrate on labelled held-out source tiles
        source = SyntheticDataset({"D033": 24}, size=64, seed=3)
        samples = [source.load("D033", t) for t in source.tile_ids("D033")]
        from stream.bootstrap import bootstrap_registry

        bootstrap_registry(
            stack.registry,
            (out / WEIGHTS_FILE).read_bytes(),
            ModelManifest.model_validate_json((out / MANIFEST_FILE).read_bytes()),
            [s.image for s in samples],
            masks=[s.mask for s in samples if s.mask is not None],
            device="cpu",
        )
        published = stack.registry.manifest("source", 0)
        assert published.architecture == "smp" and len(published.class_band_mean) == 13
        stack.start("worker", "worker")
        acqs = stack.ingest(tiles["D033"][:6], "D033")
        ids = {a.id for a in acqs}
        preds = stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=300)
        assert sorted(p["acquisition_id"] for p in preds) == sorted(ids)  # each exactly once
        assert {p["model_version"] for p in preds} == {0}
        assert all(np.isclose(sum(p["class_shares"]), 1.0) and len(p["class_shares"]) == 13 for p in preds)
        assert stack.predictions.list("") == prediction_keys(acqs)
        # a shifted departement: drift -> job -> the adaptation worker adapts and gates the smp model
        stack.start("adapt", "adapt-worker")
        stack.ingest(tiles["D013"][:30], "D013")
        versions = stack.wait_for("model_versions", lambda m: any(v["region"] == "D013" for v in m), timeout_s=400)
        made = next(v for v in versions if v["region"] == "D013")
        assert made["method"] == "bn-balanced"
        if made["accepted"]:
            adapted = stack.registry.manifest("D013", made["version"])
            assert adapted.architecture == "smp" and adapted.input_mean == published.input_mean
            assert adapted.class_band_mean == published.class_band_mean and adapted.parent == 0
        assert not stack.read("deadletter")
    finally:
        stack.stop_all()
