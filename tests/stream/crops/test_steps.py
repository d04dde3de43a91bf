"""The crop loop's message calls (what the Kafka workers run), on in-memory stores: same stages as the runner."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from monitoring.calibration import CalibrationError
from monitoring.metrics import ServiceMetrics
from serving.crop_registry import CALIBRATION_NPZ, CropRegistry
from serving.store import MemoryReader, MemoryStore
from stream.crops.bootstrap import init_crop_registry
from stream.crops.config import CropLoopConfig
from stream.crops.demo import FR2, corrupt_item, source_registry, stream_items
from stream.crops.pipeline import CropPipeline
from stream.crops.state import CropState
from stream.crops.steps import CropSteps, prediction_key
from stream.outcome import Outcome
from terradapt.crops.checkpoint import CropManifest
from terradapt.crops.records import SeriesAcquisition
from terradapt.crops.series import ParcelSeries
from terradapt.crops.stream_records import CropAdaptationJob, ParcelLabel, ParcelPrediction
from terradapt.crops.synthetic import COUNTRIES, generate_country
from terradapt.records import DeadLetter, DriftEvent, ModelVersion, RolloutEvent, RolloutStep
from tests.fakes.crops import SOURCES, source_model, source_parcels

LV = COUNTRIES["lv-1"]


def calibration() -> list[ParcelSeries]:
    return [p for r in SOURCES for p in generate_country(COUNTRIES[r], 64, seed=4)]


@dataclasses.dataclass
class World:
    steps: CropSteps
    registry: CropRegistry
    objects: MemoryStore
    predictions: MemoryStore
    metrics: CollectorRegistry


def make_world(root: Path, config: CropLoopConfig | None = None) -> World:
    torch.set_num_threads(1)
    config = config or CropLoopConfig()
    seeded = source_registry(root / "seed", source_model(), source_parcels())  # the source manifest with its prior
    manifest = seeded.manifest("source", 0)
    weights = seeded._stored_weights("source", 0)
    registry = CropRegistry(MemoryStore("models"))
    init_crop_registry(registry, weights, manifest, calibration(), config)
    objects, predictions, prom = MemoryStore("series"), MemoryStore("predictions"), CollectorRegistry()
    steps = CropSteps(
        CropPipeline(config, registry, MemoryReader(objects)),
        registry.calibration(),
        predictions=predictions,
        metrics=ServiceMetrics(prom),
    )
    return World(steps, registry, objects, predictions, prom)


class Worker:
    """Feeds messages like the faust agent does: batches, each region's stored state between calls."""

    def __init__(self, steps: CropSteps) -> None:
        self.steps = steps
        self.states: dict[str, bytes] = {}
        self.out: list[Outcome] = []

    def send(self, items: Sequence[tuple[bytes, str]], batch: int = 16) -> list[Outcome]:
        outcomes = []
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            got = self.steps.process_many([(p, k, self.states.get(k)) for p, k in chunk])
            for (_, key), outcome in zip(chunk, got, strict=True):
                if outcome.state is not None:
                    self.states[key] = outcome.state
            outcomes += got
        self.out += outcomes
        return outcomes


def payloads(items: Sequence[SeriesAcquisition]) -> list[tuple[bytes, str]]:
    return [(i.to_json(), i.region) for i in items]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("steps"))


def test_unshifted_and_shifted_countries_through_the_message_calls(world: World) -> None:
    worker = Worker(world.steps)
    fr = stream_items(world.objects, generate_country(FR2, 160, seed=2), "FR")
    lv = stream_items(world.objects, generate_country(LV, 160, seed=2), "LV")
    outcomes = worker.send(payloads(fr)) + worker.send(payloads(lv))
    predictions = [r for o in outcomes for r in o.of(ParcelPrediction)]
    assert len(predictions) == 320 and not [r for o in outcomes for r in o.of(DeadLetter)]
    # each prediction is stored where a delayed label finds it
    stored = ParcelPrediction.model_validate_json(world.predictions.get(prediction_key("lv-1", lv[0].id)))
    assert stored.model_version == 0 and stored.crop == world.steps.classes[stored.predicted]
    drift = [r for o in outcomes for r in o.of(DriftEvent)]
    assert [d.region for d in drift] == ["lv-1"] and drift[0].covariate and drift[0].tiles_seen <= 32
    jobs = [r for o in outcomes for r in o.of(CropAdaptationJob)]
    assert len(jobs) == 1 and jobs[0].region == "lv-1" and jobs[0].base_version == 0
    assert len(jobs[0].series) == world.steps.config.trigger.min_tiles  # the job leaves as soon as the buffer allows
    assert CropState.from_bytes(worker.states["fr-2"], world.steps.new_monitor(), 96).parcels == 160

    # the job: adapted on the buffer's older parcels, gated on the latest, published, the alias moved
    job = jobs[0]
    result = world.steps.run_job(job.to_json(), "lv-1")
    (version,) = result.of(ModelVersion)
    assert version.accepted and world.registry.current("lv-1") == version.version == 1
    (promoted,) = result.of(RolloutEvent)
    assert (promoted.step, promoted.version, promoted.previous) == (RolloutStep.PROMOTED, 1, 0)
    assert world.metrics.get_sample_value("terradapt_model_current_version", {"region": "lv-1"}) == 1
    adapted, manifest = world.registry.load("lv-1")
    assert manifest.job_id == job.job_id and -40 <= float(adapted.date_offset) <= -15
    # redelivered: the same version, nothing new; a stale job (base v0, region now v1) does nothing
    again = world.steps.run_job(job.to_json(), "lv-1")
    assert [v.version for v in again.of(ModelVersion)] == [1] and len(world.registry.history("lv-1")) == 1
    assert not again.of(RolloutEvent)  # the alias had moved: nothing to promote again
    stale = job.model_copy(update={"job_id": "crops-other"})
    assert world.steps.run_job(stale.to_json(), "lv-1") == Outcome()

    # the region's next parcels are predicted by v1
    more = stream_items(world.objects, generate_country(LV, 16, seed=7), "LV")
    after = worker.send(payloads(more))
    assert {r.model_version for o in after for r in o.of(ParcelPrediction)} == {1}


def test_bad_messages_become_dead_letters_and_the_region_goes_on(world: World) -> None:
    worker = Worker(world.steps)
    items = stream_items(world.objects, generate_country(FR2, 6, seed=9), "FR")
    corrupt = corrupt_item(world.objects, items[0])
    wrong_key = (items[1].to_json(), "lv-1")
    outcomes = worker.send([*payloads(items[:3]), (b"{not json", "fr-2"), wrong_key, *payloads([corrupt, *items[3:]])])
    letters = [r for o in outcomes for r in o.of(DeadLetter)]
    assert [(d.reason, d.stage) for d in letters] == [
        ("malformed_payload", "ingest"),
        ("key_mismatch", "ingest"),
        ("invalid_series", "ingest"),
    ]
    assert letters[0].payload == "{not json" and letters[0].topic == "terradapt.crop-series"
    assert len([r for o in outcomes for r in o.of(ParcelPrediction)]) == 6
    assert world.metrics.get_sample_value("terradapt_dead_letters_total", {"reason": "key_mismatch"}) == 1


def test_a_replayed_series_is_predicted_again_but_counted_once(world: World) -> None:
    worker = Worker(world.steps)
    items = stream_items(world.objects, generate_country(FR2, 4, seed=11), "FR")
    worker.send(payloads(items))
    before = CropState.from_bytes(worker.states["fr-2"], world.steps.new_monitor(), 96)
    (outcome,) = worker.send(payloads(items[-1:]))
    after = CropState.from_bytes(worker.states["fr-2"], world.steps.new_monitor(), 96)
    assert outcome.of(ParcelPrediction) and after.parcels == before.parcels
    assert after.monitor.parcels_seen == before.monitor.parcels_seen


def test_unreadable_state_starts_the_region_afresh(world: World) -> None:
    items = stream_items(world.objects, generate_country(FR2, 1, seed=12), "FR")
    (outcome,) = world.steps.process_many([(items[0].to_json(), "fr-2", b"\x00garbage")])
    assert outcome.of(ParcelPrediction) and outcome.state is not None
    assert CropState.from_bytes(outcome.state, world.steps.new_monitor(), 96).parcels == 1


def test_delayed_labels_give_per_version_accuracy(world: World) -> None:
    worker = Worker(world.steps)
    parcels = generate_country(FR2, 12, seed=13)
    items = stream_items(world.objects, parcels, "FR")
    predicted = {r.acquisition_id: r.predicted for o in worker.send(payloads(items)) for r in o.of(ParcelPrediction)}
    state: bytes | None = None
    for item, parcel in zip(items, parcels, strict=True):
        label = ParcelLabel(acquisition_id=item.id, region="fr-2", label=parcel.label)
        outcome = world.steps.process_label(label.to_json(), "fr-2", state)
        assert not outcome.messages
        state = outcome.state
    expected = np.mean([predicted[i.id] == p.label for i, p in zip(items, parcels, strict=True)])
    accuracy = world.metrics.get_sample_value("terradapt_labelled_accuracy_ratio", {"region": "fr-2", "version": "0"})
    assert accuracy == pytest.approx(expected)
    joined = world.metrics.get_sample_value("terradapt_labelled_tiles_total", {"region": "fr-2", "outcome": "joined"})
    assert joined == 12
    # a label of an unknown parcel, of a class the model lacks, or keyed by another region: dead letters
    bad = [
        (ParcelLabel(acquisition_id="fr-2_nope", region="fr-2", label=1).to_json(), "fr-2", "missing_object"),
        (ParcelLabel(acquisition_id=items[0].id, region="fr-2", label=99).to_json(), "fr-2", "malformed_payload"),
        (ParcelLabel(acquisition_id=items[0].id, region="fr-2", label=1).to_json(), "lv-1", "key_mismatch"),
    ]
    for payload, key, reason in bad:
        (letter,) = world.steps.process_label(payload, key, state).of(DeadLetter)
        assert letter.reason == reason and letter.stage == "labels"


def test_label_window_setting_bounds_the_accuracy_window(tmp_path: Path) -> None:
    world = make_world(tmp_path, CropLoopConfig(label_window=3))
    parcels = generate_country(FR2, 6, seed=14)
    items = stream_items(world.objects, parcels, "FR")
    Worker(world.steps).send(payloads(items))
    state: bytes | None = None
    for item, parcel in zip(items, parcels, strict=True):
        label = ParcelLabel(acquisition_id=item.id, region="fr-2", label=parcel.label)
        state = world.steps.process_label(label.to_json(), "fr-2", state).state
    assert state is not None
    windows = json.loads(state)["windows"]
    assert [len(w["tiles"]) for w in windows] == [3]  # the last 3 labelled parcels of fr-2 v0


def test_jobs_with_unreadable_series_and_too_few_parcels(world: World) -> None:
    items = stream_items(world.objects, generate_country(LV, 40, seed=15), "LV")
    gone = [i.model_copy(update={"href": "memory://series/lv-1/gone.npz", "sha256": None}) for i in items[:10]]
    trigger = DriftEvent(
        region="lv-1", acquisition_id=items[0].id, tiles_seen=40, signal="profile", score=2, threshold=1
    )
    job = CropAdaptationJob(
        job_id="crops-few",
        region="lv-1",
        base_version=1,
        method="phenology-bn",
        series=(*gone, *items[:20]),
        trigger=trigger,
    )
    (letter,) = world.steps.run_job(job.to_json(), "lv-1").of(DeadLetter)
    assert letter.reason == "insufficient_parcels" and "20 readable series" in letter.error
    (letter,) = world.steps.run_job(b"[]", "lv-1").of(DeadLetter)
    assert letter.reason == "malformed_payload" and letter.stage == "adapt"


def test_registry_calibration_is_checked(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    store = world.registry.store
    assert isinstance(store, MemoryStore)
    store.put(CALIBRATION_NPZ, b"tampered")
    with pytest.raises(CalibrationError, match="sha256"):
        world.registry.calibration()
    with pytest.raises(CalibrationError, match="crops init"):
        CropRegistry(MemoryStore("empty")).calibration()
    registry = CropRegistry(MemoryStore("few"))
    manifest = world.registry.manifest("source", 0)
    weights = world.registry._stored_weights("source", 0)
    with pytest.raises(CalibrationError, match="window"):
        init_crop_registry(
            registry, weights, CropManifest.model_validate(manifest.model_dump()), calibration()[:20], CropLoopConfig()
        )
