"""End-to-end test of the embedded runner on a tiny configuration (the same loop `make demo` runs)."""

import pytest

from stream.config import Settings
from stream.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo = {
        "workdir": root / "work",
        "cache_dir": root / "cache",
        "report_dir": root / "report",
        "tile_size": 128,
        "train_tiles": 12,
        "calibration_tiles": 40,
        "stream_tiles": 24,
        "eval_tiles": 4,
        "train_steps": 120,
    }
    return run_demo(
        Settings.model_validate({"demo": demo, "runtime": {"device": "cpu"}, "adaptation": {"device": "cpu"}})
    )


def test_in_distribution_region_raises_no_drift(demo):
    rows = {r.region: r for r in demo.rows}
    assert rows["D033"].drift_at is None
    assert rows["D033"].version == 0
    assert not [e for e in demo.run.drift_events if e.region == "D033"]


def test_covariate_shifted_regions_are_detected_early(demo):
    rows = {r.region: r for r in demo.rows}
    for region in ("D013", "D067"):
        assert rows[region].drift_at is not None and rows[region].drift_at <= 16, rows[region]
        assert "radiometry" in rows[region].signal.split(","), rows[region]


def test_adapted_version_deployed_only_where_drift_and_not_worse(demo):
    rows = {r.region: r for r in demo.rows}
    adapted = [r for r in demo.rows if r.version > 0]
    assert adapted, "no region got an adapted version"
    assert {r.region for r in adapted} <= {"D013", "D067"}
    for r in adapted:
        assert r.miou_current >= r.miou_source, r
    assert rows["D029"].version == 0  # label shift only: never adapted
    assert {e.region for e in demo.run.rollouts} == {r.region for r in adapted}


def test_report_written(demo):
    html = demo.report.read_text()
    assert "D013" in html and "data:image/png;base64," in html
    assert (demo.report.parent / "drift.png").stat().st_size > 10_000


def test_jobs_carry_a_label_shift_estimate_from_the_source_confusion(demo):
    """The calibration's labelled tiles give BBSE its confusion matrix; each job's gate saw the estimate."""
    assert demo.run.adaptations
    for adapted in demo.run.adaptations:
        manifest_metrics = adapted.gate_metrics
        assert "tv_reference_to_prior" in manifest_metrics, manifest_metrics
        assert 0.0 <= manifest_metrics["tv_reference_to_prior"] <= 1.0


def test_delayed_labels_reach_the_accuracy_of_each_version(demo):
    """The dataset's masks travel as LabelRecords through the same label path as on Kafka."""
    regions = {region for region, _ in demo.run.confusion}
    assert {"D033", "D013", "D067", "D029"} <= regions
    for (region, version), cm in demo.run.confusion.items():
        assert cm.sum() > 0 and 0.0 <= demo.run.region_miou(region, version) <= 1.0
    assert not demo.run.dead_letters
