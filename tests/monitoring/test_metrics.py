"""ServiceMetrics: names, units, bounded labels, and what each pipeline call does to the exported series."""

import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

import terradapt.errors as errors
from monitoring.metrics import DEAD_LETTER_REASONS, OTHER, ServiceMetrics, serve
from terradapt.records import RolloutEvent, RolloutStep

ALLOWED_LABELS = {"region", "outcome", "reason", "stage", "signal", "version", "method", "step", "le"}


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def metrics(registry):
    return ServiceMetrics(registry)


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def series(registry, name):
    """Label sets of every sample called ``name``."""
    return [s.labels for fam in registry.collect() for s in fam.samples if s.name == name]


def test_names_units_and_labels_follow_conventions(registry, metrics):
    metrics.observe_tile("D033", 0.1)
    metrics.observe_drift("D033", {"radiometry": 1.0}, {"radiometry": 2.0}, ())
    metrics.observe_adaptation("D033", "bn", "accepted", 3.0)
    metrics.observe_accuracy("D033", 0, 0.9, 0.5, 10)
    families = list(registry.collect())
    names = {f.name for f in families}
    assert len(names) >= 17
    for fam in families:
        assert fam.name.startswith("terradapt_"), fam.name
        if fam.type == "counter":
            assert any(s.name == fam.name + "_total" for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (fam.name, s.labels)


def test_metrics_live_on_the_injected_registry_only(registry):
    ServiceMetrics(registry)
    other = CollectorRegistry()
    ServiceMetrics(other).observe_tile("D013", 0.2)  # a second process/test: its own registry, no clash
    assert value(registry, "terradapt_tiles_processed_total", region="D013", outcome="ok") is None
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ServiceMetrics(registry)  # why there are no module-level metrics


def test_observe_tile_counts_and_times(registry, metrics):
    for _ in range(3):
        metrics.observe_tile("D013", 0.02)
    metrics.observe_tile("D013", 0.5, "dead_letter")
    metrics.observe_stage("predict", 0.01)
    assert value(registry, "terradapt_tiles_processed_total", region="D013", outcome="ok") == 3
    assert value(registry, "terradapt_tiles_processed_total", region="D013", outcome="dead_letter") == 1
    assert value(registry, "terradapt_tile_latency_seconds_count", stage="total") == 4
    assert value(registry, "terradapt_tile_latency_seconds_count", stage="predict") == 1
    with pytest.raises(ValueError, match="accepted: ok, dead_letter"):
        metrics.observe_tile("D013", 0.1, "maybe")
    with pytest.raises(ValueError, match="stage"):
        metrics.observe_stage("tile-123", 0.1)


def test_region_labels_are_bounded(registry):
    m = ServiceMetrics(registry, regions=["D02A", "D033"])
    for i in range(50):
        m.observe_tile(f"tile-{i}-2024-06-01", 0.1)  # ids, dates: never labels
        m.observe_tile(f"D0{i:02d}", 0.1)  # well-formed but not served
    m.observe_tile("D02A", 0.1)
    regions = {lab["region"] for lab in series(registry, "terradapt_tiles_processed_total")}
    assert regions == {"D02A", "D033", OTHER}  # D033 was among the well-formed ones, and is served
    assert value(registry, "terradapt_tiles_processed_total", region=OTHER, outcome="ok") == 99
    assert value(registry, "terradapt_tiles_processed_total", region="D02A", outcome="ok") == 1


def test_unknown_names_become_other(registry, metrics):
    metrics.observe_drift("D013", {"Bad Signal!": 3.0}, {"Bad Signal!": 1.0}, ("Bad Signal!",))
    assert value(registry, "terradapt_drift_score", region="D013", signal=OTHER) == 3.0
    metrics.observe_dead_letter("something new")
    assert value(registry, "terradapt_dead_letters_total", reason=OTHER) == 1


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_dead_letter_reasons_cover_every_typed_error(registry):
    reasons = {cls.reason for cls in _subclasses(errors.TerradaptError)} | {errors.TerradaptError.reason}
    assert reasons <= set(DEAD_LETTER_REASONS)
    ServiceMetrics(registry)
    for reason in DEAD_LETTER_REASONS:  # created at zero: increase() sees the first dead letter
        assert value(registry, "terradapt_dead_letters_total", reason=reason) == 0


def test_counters_of_a_new_region_start_at_zero(registry, metrics):
    metrics.observe_tile("D067", 0.1)
    for step in RolloutStep:
        assert value(registry, "terradapt_rollout_events_total", region="D067", step=step.value) == 0
    for outcome in ("joined", "unmatched", "invalid"):
        assert value(registry, "terradapt_labelled_tiles_total", region="D067", outcome=outcome) == 0
    metrics.observe_adaptation("D067", "tent", "rejected", 12.0)
    assert value(registry, "terradapt_adaptation_runs_total", region="D067", method="tent", outcome="accepted") == 0
    assert value(registry, "terradapt_adaptation_runs_total", region="D067", method="tent", outcome="rejected") == 1
    assert value(registry, "terradapt_adaptation_duration_seconds_sum", method="tent") == 12.0
    with pytest.raises(ValueError, match="accepted, rejected, failed"):
        metrics.observe_adaptation("D067", "tent", "crashed", 1.0)


def test_observe_drift_sets_gauges_and_counts_new_detections(registry, metrics):
    scores = {"radiometry": 30.0, "prediction": 1.0}
    thresholds = {"radiometry": 12.0, "prediction": 20.0}
    metrics.observe_drift("D013", scores, thresholds, ("radiometry",), newly_detected=True)
    metrics.observe_drift("D013", scores, thresholds, ("radiometry",))  # still in drift: not a new event
    assert value(registry, "terradapt_drift_score", region="D013", signal="radiometry") == 30.0
    assert value(registry, "terradapt_drift_threshold", region="D013", signal="radiometry") == 12.0
    assert value(registry, "terradapt_drift_detected", region="D013", signal="radiometry") == 1
    assert value(registry, "terradapt_drift_detected", region="D013", signal="prediction") == 0
    assert value(registry, "terradapt_drift_events_total", region="D013", signal="radiometry") == 1
    assert value(registry, "terradapt_drift_events_total", region="D013", signal="prediction") == 0
    metrics.observe_drift("D013", {"radiometry": 0.0, "prediction": 0.0}, thresholds, ())  # re-baselined
    assert value(registry, "terradapt_drift_detected", region="D013", signal="radiometry") == 0


def test_model_info_keeps_one_current_and_one_previous_series(registry, metrics):
    metrics.observe_prediction("D013", 0, 0.8)
    assert series(registry, "terradapt_model_info") == [{"region": "D013", "version": "0"}]
    metrics.observe_rollout(RolloutEvent(region="D013", version=1, step=RolloutStep.REGISTERED))
    assert value(registry, "terradapt_model_current_version", region="D013") == 0  # registered != served
    metrics.observe_rollout(RolloutEvent(region="D013", version=1, step=RolloutStep.PROMOTED, previous=0))
    metrics.observe_rollout(RolloutEvent(region="D013", version=2, step=RolloutStep.PROMOTED, previous=1))
    assert series(registry, "terradapt_model_info") == [{"region": "D013", "version": "2"}]
    assert series(registry, "terradapt_model_previous_info") == [{"region": "D013", "version": "1"}]
    assert value(registry, "terradapt_model_current_version", region="D013") == 2
    assert value(registry, "terradapt_rollout_events_total", region="D013", step="promoted") == 2
    metrics.observe_rollout(RolloutEvent(region="D013", version=1, step=RolloutStep.ROLLED_BACK, previous=2))
    assert series(registry, "terradapt_model_info") == [{"region": "D013", "version": "1"}]
    assert series(registry, "terradapt_model_previous_info") == [{"region": "D013", "version": "2"}]
    assert value(registry, "terradapt_rollout_events_total", region="D013", step="rolled_back") == 1


def test_confidence_is_a_rolling_mean(registry):
    m = ServiceMetrics(registry, confidence_window=3)
    for c in (0.1, 0.2, 0.6, 0.7, 0.8):
        m.observe_prediction("D029", 0, c)
    assert value(registry, "terradapt_mean_confidence_ratio", region="D029") == pytest.approx(0.7)


def test_accuracy_series_are_pruned_to_recent_versions(registry):
    m = ServiceMetrics(registry, max_versions_per_region=2)
    for v in range(4):
        m.observe_accuracy("D013", v, 0.5 + v / 10, 0.3, tiles=5)
    m.observe_accuracy("D067", 0, 0.7, 0.4, tiles=1)
    kept = sorted((lab["region"], lab["version"]) for lab in series(registry, "terradapt_labelled_miou_ratio"))
    assert kept == [("D013", "2"), ("D013", "3"), ("D067", "0")]
    assert value(registry, "terradapt_labelled_accuracy_ratio", region="D013", version="3") == pytest.approx(0.8)
    assert value(registry, "terradapt_labelled_window_tiles", region="D013", version="3") == 5
    m.observe_label("D013", "joined")
    assert value(registry, "terradapt_labelled_tiles_total", region="D013", outcome="joined") == 1


def test_serve_exposes_the_registry_on_loopback_and_stops(registry, metrics):
    metrics.observe_tile("D033", 0.1)
    server = metrics.serve(0)
    try:
        assert server.host == "127.0.0.1"
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert 'terradapt_tiles_processed_total{outcome="ok",region="D033"} 1.0' in body
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)
    other = serve(CollectorRegistry(), 0)  # the module-level helper, for a registry without ServiceMetrics
    other.stop()


def test_import_monitoring_stays_light():
    code = (
        "import sys, monitoring\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "import monitoring.metrics, monitoring.accuracy, monitoring.dashboard\n"
        "heavy = [m for m in ('aiohttp', 'torch', 'faust', 'minio', 'matplotlib') if m in sys.modules]\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
