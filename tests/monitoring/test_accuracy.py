"""DelayedLabelTracker: late labels joined by acquisition id with the version that predicted, bounded memory."""

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitoring.accuracy import DelayedLabelTracker, PendingPrediction
from monitoring.metrics import ServiceMetrics
from terradapt.errors import ObjectNotFoundError
from terradapt.metrics import confusion_matrix, miou
from terradapt.records import TilePrediction

K = 4
IGNORE = 255


def tile(seed, size=8):
    return np.random.default_rng(seed).integers(0, K, (size, size)).astype(np.uint8)


def noisy(truth, seed, p=0.3):
    rng = np.random.default_rng(seed)
    pred = truth.copy()
    flip = rng.random(truth.shape) < p
    pred[flip] = rng.integers(0, K, int(flip.sum()))
    return pred


def test_perfect_prediction_scores_one():
    t = DelayedLabelTracker(K, window=5)
    truth = tile(0)
    t.record_prediction("a", "D013", 0, class_map=truth)
    join = t.add_label("a", truth)
    assert join.outcome == "joined"
    assert (join.region, join.version, join.tile_accuracy) == ("D013", 0, 1.0)
    assert join.window is not None
    assert join.window.accuracy == 1.0 and join.window.miou == 1.0
    assert join.window.tiles == 1 and join.window.pixels == 64
    assert t.pending == 0 and t.stored_maps == 0


def test_label_is_scored_against_the_version_that_predicted_it():
    t = DelayedLabelTracker(K, window=10)
    truths = {f"t{i}": tile(i) for i in range(4)}
    # v0 predicts t0, t1 (badly); the region is then rolled out to v1, which predicts t2, t3 (well)
    for i, (acq, truth) in enumerate(truths.items()):
        version = 0 if i < 2 else 1
        t.record_prediction(acq, "D013", version, class_map=noisy(truth, i, p=0.6 if version == 0 else 0.05))
    # labels arrive later, in another order, after the rollout
    for acq in ("t3", "t0", "t2", "t1"):
        assert t.add_label(acq, truths[acq]).outcome == "joined"
    v0, v1 = t.window("D013", 0), t.window("D013", 1)
    assert v0 is not None and v1 is not None
    assert v0.tiles == v1.tiles == 2
    assert v1.accuracy > 0.9 > v0.accuracy
    assert [(w.region, w.version) for w in t.windows()] == [("D013", 0), ("D013", 1)]


def test_rolling_window_follows_recent_tiles():
    t = DelayedLabelTracker(K, window=3)
    cms = []
    for i in range(10):
        truth, pred = tile(i), noisy(tile(i), 100 + i, p=0.1 * (i % 5))
        t.record_prediction(str(i), "D067", 0, class_map=pred)
        t.add_label(str(i), truth)
        cms.append(confusion_matrix(pred, truth, K, IGNORE))
    expected = sum(cms[-3:])
    assert isinstance(expected, np.ndarray)
    w = t.window("D067", 0)
    assert w is not None
    assert w.tiles == 3
    assert w.pixels == int(expected.sum())
    assert w.accuracy == pytest.approx(np.trace(expected) / expected.sum())
    assert w.miou == pytest.approx(miou(expected))


def test_ignored_pixels_are_not_scored():
    t = DelayedLabelTracker(K)
    truth = tile(1)
    pred = truth.copy()
    pred[:4] = (pred[:4] + 1) % K  # wrong on the top half...
    label = truth.copy()
    label[:4] = IGNORE  # ...which is unlabelled
    t.record_prediction("a", "D029", 0, class_map=pred)
    join = t.add_label("a", label)
    assert join.window is not None
    assert join.window.accuracy == 1.0 and join.window.pixels == 32


def test_unmatched_and_invalid_labels():
    t = DelayedLabelTracker(K)
    assert t.add_label("never-seen", tile(0)).outcome == "unmatched"
    t.record_prediction("a", "D013", 2, class_map=tile(0))
    bad = t.add_label("a", np.zeros((4, 4), np.uint8))
    assert bad.outcome == "invalid" and "shape" in bad.detail and bad.region == "D013"
    assert t.pending == 1  # a corrected label can still be joined
    assert t.add_label("a", tile(0)).outcome == "joined"
    assert t.add_label("a", tile(0)).outcome == "unmatched"  # labelled once only


def test_class_maps_are_fetched_from_storage_when_not_in_memory():
    stored = {"s3://pred/D013/a.tif": tile(5)}
    calls = []

    def fetch(p: PendingPrediction):
        calls.append(p)
        if p.href not in stored:
            raise ObjectNotFoundError(str(p.href))
        return stored[p.href]

    t = DelayedLabelTracker(K, fetch=fetch)
    prediction = TilePrediction(
        acquisition_id="a",
        region="D013",
        model_version=1,
        href="s3://pred/D013/a.tif",
        class_shares=(0.25,) * 4,
        mean_entropy=0.5,
        latency_s=0.01,
    )
    t.record(prediction)
    t.record_prediction("b", "D013", 1, href="s3://pred/D013/missing.tif")
    joined = t.add_label("a", tile(5))
    assert joined.window is not None
    assert joined.window.accuracy == 1.0
    assert calls[0] == PendingPrediction("a", "D013", 1, "s3://pred/D013/a.tif")
    with pytest.raises(ObjectNotFoundError):
        t.add_label("b", tile(6))
    assert t.pending == 1  # kept for a retry


def test_a_prediction_needs_a_map_or_a_fetch():
    with pytest.raises(ValueError, match="fetch"):
        DelayedLabelTracker(K).record_prediction("a", "D013", 0)
    with pytest.raises(ValueError, match="window"):
        DelayedLabelTracker(K, window=0)


def test_memory_is_bounded():
    t = DelayedLabelTracker(K, max_pending=3, max_stored_maps=2)
    for i in range(6):
        t.record_prediction(str(i), "D013", 0, class_map=tile(i))
    assert t.stored_maps == 2 and t.pending == 2  # no fetch: a prediction without its map is forgotten
    assert t.evicted == 4
    assert t.add_label("0", tile(0)).outcome == "unmatched"
    assert t.add_label("5", tile(5)).outcome == "joined"

    fetched = DelayedLabelTracker(K, max_pending=3, max_stored_maps=1, fetch=lambda p: tile(int(p.acquisition_id)))
    for i in range(6):
        fetched.record_prediction(str(i), "D013", 0, class_map=tile(i))
    assert fetched.stored_maps == 1 and fetched.pending == 3
    assert fetched.add_label("3", tile(3)).outcome == "joined"  # map dropped from memory, fetched again
    assert fetched.add_label("0", tile(0)).outcome == "unmatched"  # oldest pending forgotten

    versions = DelayedLabelTracker(K, max_versions_per_region=2)
    for v in range(4):
        versions.record_prediction(f"x{v}", "D067", v, class_map=tile(v))
        versions.add_label(f"x{v}", tile(v))
    assert [w.version for w in versions.windows()] == [2, 3]


def test_state_round_trips_through_json():
    t = DelayedLabelTracker(K, window=4, fetch=lambda p: tile(0))
    for i in range(6):
        t.record_prediction(f"a{i}", "D013", i % 2, class_map=noisy(tile(i), i))
        t.add_label(f"a{i}", tile(i))
    t.record_prediction("later", "D013", 1, href="s3://x/later.tif")
    state = json.loads(json.dumps(t.state_dict()))
    restored = DelayedLabelTracker(K, window=4, fetch=lambda p: tile(0))
    restored.load_state_dict(state)
    assert restored.windows() == t.windows()
    assert restored.pending == 1
    assert restored.add_label("later", tile(0)).outcome == "joined"
    with pytest.raises(ValueError, match="num_classes"):
        DelayedLabelTracker(K + 1).load_state_dict(state)


def test_joined_labels_feed_service_metrics():
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    t = DelayedLabelTracker(K, window=8)
    for i in range(5):
        t.record_prediction(f"a{i}", "D013", 1, class_map=noisy(tile(i), i, p=0.2))
    for i in range(5):
        join = t.add_label(f"a{i}", tile(i))
        metrics.observe_label("D013", join.outcome)
        w = join.window
        assert w is not None
        metrics.observe_accuracy(w.region, w.version, w.accuracy, w.miou, w.tiles)
    w = t.window("D013", 1)
    assert w is not None
    labels = {"region": "D013", "version": "1"}
    assert registry.get_sample_value("terradapt_labelled_accuracy_ratio", labels) == pytest.approx(w.accuracy)
    assert registry.get_sample_value("terradapt_labelled_miou_ratio", labels) == pytest.approx(w.miou)
    assert registry.get_sample_value("terradapt_labelled_window_tiles", labels) == 5
    assert registry.get_sample_value("terradapt_labelled_tiles_total", {"region": "D013", "outcome": "joined"}) == 5
