"""Few-label adaptation through the pipeline: delayed labels kept per region, a few-shot job when K are in, its version.

``process_label`` keeps each joined label in the label store (mask COG + image copy + JSON index, under
``labels/`` in the prediction store) and emits a few-shot job at K labels, then each time the count doubled;
``run_job`` fine-tunes, judges on held-out labels, publishes (``labels_used`` in the manifest) and rolls out with
images only. Also the label store itself (round trip, replays, bound, expiry, bad ids).
"""

import json

import numpy as np
import pytest
from affine import Affine

from serving.label_store import LabelStore
from serving.rollout import InProcessDeployer
from serving.store import MemoryReader, MemoryStore
from stream.embedded import EmbeddedRunner, RunRecorder, RunResult
from stream.scenarios import stream_item
from terradapt.errors import InvalidPayloadError
from terradapt.raster import Raster, raster_to_geotiff_bytes
from terradapt.records import AdaptationJob, LabelRecord, RolloutStep
from tests.fakes.world import make_rig, publish, settings

FEW_SHOT = {"few_shot": {"enabled": True, "steps": 20}}


class RecordingDeployer(InProcessDeployer):
    """The in-process deployer, remembering the context of every rollout."""

    def __init__(self, registry):
        super().__init__(registry)
        self.contexts = []

    def rollout(self, region, version, context=None):
        self.contexts.append(context)
        return super().rollout(region, version, context)


def _rig(world, root, config):
    rig = make_rig(world, root, config)
    rig.pipeline.deployer = RecordingDeployer(rig.registry)
    state = None
    for i, s in enumerate(world.shifted[:6]):  # predicted first: the prediction COG is what a label joins
        state = rig.pipeline.process(publish(rig.objects, "D013", i, s.image), "D013", state).state
    return rig


@pytest.fixture
def rig(world, tmp_path):
    return _rig(world, tmp_path / "models", settings(adaptation=FEW_SHOT))


def _label(rig, index, mask, region="D013"):
    data = raster_to_geotiff_bytes(Raster(mask[None].astype(np.uint8), None, Affine.identity()))
    href = rig.objects.put(f"{region}/labels/{index}.tif", data)
    return LabelRecord(acquisition_id=f"{region}-{index:05d}", region=region, href=href).to_json()


def _labels(rig, world, indices):
    """Deliver labels in order (tracker state carried along); the few-shot jobs they emitted, by label index."""
    state, jobs = None, {}
    for i in indices:
        out = rig.pipeline.process_label(_label(rig, i, world.shifted[i].mask), "D013", state)
        state = out.state
        assert not out.records("deadletter")
        if out.of(AdaptationJob):
            (jobs[i],) = out.of(AdaptationJob)
    return jobs


# -- the label path ------------------------------------------------------------------------------------------------
def test_a_few_shot_job_is_emitted_at_k_labels_then_when_the_count_doubled(rig, world):
    jobs = _labels(rig, world, range(4))
    assert sorted(jobs) == [1, 3]  # K = 2, then 4
    first, second = jobs[1], jobs[3]
    assert first.labels == ("D013-00000", "D013-00001") and second.labels == tuple(f"D013-{i:05d}" for i in range(4))
    assert first.method == "few-shot" and first.base_version == 0 and first.tile_ids == ()
    assert first.job_id == "few-shot-D013-00001" and first.trigger.signal == "labels"
    assert rig.pipeline.labels is not None and rig.pipeline.labels.list("D013") == list(second.labels)


def test_the_job_publishes_a_few_shot_version_that_records_its_labels_and_rolls_out_without_masks(rig, world):
    job = _labels(rig, world, range(2))[1]
    out = rig.pipeline.run_job(job.to_json(), "D013")
    assert [m.topic for m in out.messages] == ["model_versions", "rollouts"]
    version = out.records("model_versions")[0]
    assert version.method == "few-shot" and version.accepted and rig.registry.current("D013") == 1
    assert out.records("rollouts")[0].step == RolloutStep.PROMOTED
    manifest = rig.registry.manifest("D013", 1)
    assert manifest.labels_used == job.labels and manifest.gate_metrics["folds"] == 2.0
    (context,) = rig.pipeline.deployer.contexts
    assert len(context.tiles) == 2 and all(t.mask is None for t in context.tiles)  # labels never judge their model
    again = rig.pipeline.run_job(job.to_json(), "D013")
    assert [m.topic for m in again.messages] == ["model_versions"] and len(rig.registry.history("D013")) == 1


def test_labels_that_trained_the_current_version_never_score_it(rig, world):
    rig.pipeline.run_job(_labels(rig, world, range(2))[1].to_json(), "D013")  # v1 trained on labels 0 and 1
    job = _labels(rig, world, range(2, 4))[3]
    assert job.base_version == 1  # issued while v1 served
    rig.pipeline.run_job(job.to_json(), "D013")
    manifest = rig.registry.manifest("D013", 2)
    assert manifest.labels_used == job.labels and len(job.labels) == 4 and manifest.parent == 1
    scored = {k.split(":", 1)[1] for k in manifest.gate_metrics if k.startswith("heldout_fold:")}
    assert scored == {"D013-00002", "D013-00003"}


def test_unloadable_labels_are_typed_dead_letters(rig, world):
    job = _labels(rig, world, range(2))[1]
    store = rig.predictions
    store.delete("labels/D013/D013-00000.tif")  # one mask gone: one label left, nothing to hold out
    out = rig.pipeline.run_job(job.to_json(), "D013")
    assert out.records("deadletter")[0].reason == "too_few_labels"
    store.delete("labels/D013/D013-00001.tif")
    out = rig.pipeline.run_job(job.model_copy(update={"job_id": "other"}).to_json(), "D013")
    assert out.records("deadletter")[0].reason == "no_tiles"


def test_few_shot_is_off_by_default_and_keeps_nothing(world, tmp_path):
    rig = _rig(world, tmp_path / "m", settings())
    assert _labels(rig, world, range(4)) == {}
    assert rig.predictions.list("labels/") == []


def test_the_embedded_runner_feeds_delayed_labels_into_few_shot_versions(world, tmp_path):
    """The runner moves label messages and the jobs they emit like any other: no code of its own for few-shot."""
    rig = make_rig(world, tmp_path / "m", settings(adaptation=FEW_SHOT))
    runner = EmbeddedRunner(rig.pipeline, rig.objects, RunRecorder(RunResult()), label_delay=1)
    items = [stream_item("D013", i, s, world.manifest.bands) for i, s in enumerate(world.shifted[:4])]
    result = runner.run(items)
    assert [(v.method, v.version, v.parent) for v in result.adaptations] == [("few-shot", 1, 0), ("few-shot", 2, 1)]
    assert rig.registry.manifest("D013", 2).labels_used == tuple(f"D013-{i:05d}" for i in range(4))
    assert not result.dead_letters


def test_min_labels_set_through_the_environment_changes_when_the_job_comes(world, tmp_path, env):
    first = {}
    for k in ("2", "3"):
        config = env(ADAPTATION__FEW_SHOT__ENABLED="true", ADAPTATION__FEW_SHOT__MIN_LABELS=k)
        rig = _rig(world, tmp_path / k, config)
        jobs = _labels(rig, world, range(4))
        first[k] = len(jobs[min(jobs)].labels)
    assert first == {"2": 2, "3": 3}


# -- the label store -------------------------------------------------------------------------------------------------
def _tile(seed, size=32):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (5, size, size), dtype=np.uint8)
    mask = rng.integers(0, 13, (size, size), dtype=np.uint8)
    data = raster_to_geotiff_bytes(Raster(image, "EPSG:2154", Affine(0.2, 0, 0, 0, -0.2, 0)))
    return image, mask, data


@pytest.fixture
def stores():
    objects, labels = MemoryStore("acquisitions"), MemoryStore("predictions")
    return objects, labels, MemoryReader(objects)


def test_label_store_round_trip_in_json_and_geotiff_only(stores):
    objects, store, reader = stores
    labels = LabelStore(store, reader)
    tiles = {}
    for i in range(3):
        image, mask, data = _tile(i)
        tiles[f"a-{i}"] = (image, mask)
        assert labels.add("D013", f"a-{i}", objects.put(f"D013/a-{i}.tif", data), mask) == i + 1
    assert labels.list("D013") == ["a-0", "a-1", "a-2"] and labels.list("D033") == []
    loaded = labels.load("D013", ["a-2", "a-0", "missing"])
    assert [t.acquisition_id for t in loaded] == ["a-2", "a-0"]
    for t in loaded:
        image, mask = tiles[t.acquisition_id]
        assert t.mask is not None and np.array_equal(t.mask, mask) and np.array_equal(t.image, image)
    index = json.loads(store.get("labels/D013/index.json"))
    assert index["added"] == 3 and [t["id"] for t in index["tiles"]] == ["a-0", "a-1", "a-2"]
    assert all(k.endswith((".tif", ".json")) for k in store.list("labels/"))


def test_label_store_counts_a_replay_once_and_keeps_a_corrected_mask(stores):
    objects, store, reader = stores
    labels = LabelStore(store, reader)
    _, mask, data = _tile(0)
    href = objects.put("D013/a.tif", data)
    labels.add("D013", "a", href, mask)
    assert labels.add("D013", "a", href, 12 - mask) == 1 and labels.count("D013") == 1
    (tile,) = labels.load("D013", ["a"])
    assert tile.mask is not None and np.array_equal(tile.mask, 12 - mask)


def test_label_store_is_bounded_and_deletes_what_it_drops(stores):
    objects, store, reader = stores
    labels = LabelStore(store, reader, max_tiles=2)
    for i in range(4):
        _, mask, data = _tile(i)
        labels.add("D013", f"a-{i}", objects.put(f"D013/a-{i}.tif", data), mask)
    assert labels.list("D013") == ["a-2", "a-3"] and labels.count("D013") == 4
    assert not any("a-0" in k or "a-1" in k for k in store.list("labels/"))


def test_kept_images_survive_the_acquisitions_expiry_and_referenced_ones_do_not(stores):
    objects, store, reader = stores
    copied, referenced = LabelStore(store, reader), LabelStore(store, reader, prefix="refs/", keep_images=False)
    _, mask, data = _tile(0)
    href = objects.put("D013/a.tif", data)
    copied.add("D013", "a", href, mask)
    referenced.add("D013", "a", href, mask)
    objects.delete("D013/a.tif")  # the acquisitions bucket's lifecycle rule
    assert len(copied.load("D013", ["a"])) == 1 and referenced.load("D013", ["a"]) == []


@pytest.mark.parametrize(("region", "acquisition_id"), [("D013", "../escape"), ("D013", "a/b"), ("nowhere", "a")])
def test_label_store_refuses_names_that_cannot_be_keys(stores, region, acquisition_id):
    _, store, reader = stores
    with pytest.raises(InvalidPayloadError):
        LabelStore(store, reader, keep_images=False).add(
            region, acquisition_id, "memory://x", np.zeros((4, 4), np.uint8)
        )
