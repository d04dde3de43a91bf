"""Fuzzing the worker path: any message ends as its records or a dead letter with a typed reason.

The three calls the runners make, on a pipeline built from settings as every runner builds it (tiny trained model,
file-system prediction store so object keys are real paths): ``process`` (acquisition payload bytes + key + stored
state), ``process_label`` and ``run_job``. Inputs: valid payloads with fields broken at any depth, any JSON, any
bytes, STAC Items naming mutated GeoTIFFs (bit flips, truncation, rewritten header tags) or objects that are not
there, keys that are not the region, stored states that are garbage. ``internal_error`` / ``adaptation_failed``
dead letters are what ``Pipeline`` makes of an exception no stage typed: each one is a bug, so none is allowed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from serving.store import FileSystemStore, MemoryReader, MemoryStore
from stream.build import build_pipeline
from stream.outcome import Outcome
from stream.pipeline import Pipeline
from terradapt.records import Acquisition, AdaptationJob, DeadLetter, DriftEvent, LabelRecord
from tests.conftest import examples
from tests.fakes.payloads import broken, json_values, payloads
from tests.fakes.tiff_mutations import Mutant, base_tiles, mask_tiles, mutants
from tests.fakes.world import fresh_registry, publish
from tests.fakes.world import settings as world_settings

pytestmark = pytest.mark.fuzz

#: reasons Pipeline gives exceptions that no stage typed
UNTYPED = {"internal_error", "adaptation_failed"}


def keys(region: str) -> st.SearchStrategy[str | None]:
    """Message keys: mostly the region (as producers key them), sometimes another region, none, or any text."""
    return st.one_of(
        st.just(region),
        st.just(region),
        st.just(region),
        st.sampled_from(["D033", "D013", "D029", "../D033"]),
        st.none(),
        st.text(max_size=12),
    )


class Rig:
    """The pipeline under fuzz, its object store and a counter for fresh object names."""

    def __init__(self, pipeline: Pipeline, objects: MemoryStore) -> None:
        self.pipeline = pipeline
        self.objects = objects
        self.count = 0
        self.region_state: dict[str, object] = {}  # a valid stored state of each kind, to break
        self.label_state: dict[str, object] = {}

    def put(self, key: str, data: bytes) -> str:
        self.count += 1
        return self.objects.put(key.format(n=self.count), data, "image/tiff")


@pytest.fixture(scope="module")
def rig(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-pipeline")
    objects = MemoryStore("acquisitions")
    config = world_settings(
        stream={"predict_retries": 0},
        adaptation={"few_shot": {"enabled": True, "min_labels": 2, "steps": 2, "crop": 32}},
    )
    pipeline = build_pipeline(
        config,
        registry=fresh_registry(world, root / "models"),
        reader=MemoryReader(objects),
        predictions=FileSystemStore(root / "predictions"),
    )
    pipeline.sleep = lambda _: None
    r = Rig(pipeline, objects)
    state = None
    for i, sample in enumerate(world.source[:3]):  # predictions to join labels with, tiles for jobs
        out = pipeline.process(publish(objects, "D033", i, sample.image), "D033", state)
        assert [m.topic for m in out.messages][:2] == ["predictions", "features"] and out.state is not None
        state = out.state
    assert state is not None
    r.region_state = json.loads(state)
    href = r.put("D033/labels/{n}.tif", mask_tiles()["mask-strips"])
    label = LabelRecord(acquisition_id="D033-00000", region="D033", href=href)
    out = pipeline.process_label(label.to_json(), "D033", None)
    assert out.state is not None and not out.messages
    r.label_state = json.loads(out.state)
    for i, sample in enumerate(world.shifted[:3]):
        publish(objects, "D013", i, sample.image)
    return r


def _check(outcome: Outcome, payload: bytes, allowed: set[str]) -> None:
    """Records of the call's own topics, or exactly one dead letter that keeps the payload and a typed reason."""
    topics = [m.topic for m in outcome.messages]
    if "deadletter" in topics:
        event(f"dead letter: {outcome.messages[0].record.reason}")  # type: ignore[attr-defined]
    else:
        event(" ".join(topics) or "nothing to publish")
    if "deadletter" in topics:
        assert topics == ["deadletter"], topics
        letter = outcome.messages[0].record
        assert isinstance(letter, DeadLetter)
        assert letter.reason not in UNTYPED, f"untyped failure: {letter.reason}: {letter.error}"
        assert letter.payload == payload.decode("utf-8", errors="replace") and letter.error
        return
    assert set(topics) <= allowed, topics


# == acquisitions ==================================================================================================
STAC = json.loads(
    Acquisition(
        id="D033-fuzz",
        region="D033",
        datetime=datetime(2024, 6, 1, tzinfo=UTC),
        bbox=(0.0, 0.0, 1.0, 1.0),
        href="memory://acquisitions/D033/D033-00000.tif",
    ).to_json()
)
HREFS = st.sampled_from(
    [
        "memory://acquisitions/D033/D033-00001.tif",  # a valid tile
        "memory://acquisitions/D033/missing.tif",
        "memory://other-bucket/D033/D033-00001.tif",
        "file:///etc/passwd",
        "s3://acquisitions/D033/x.tif",
        "/vsicurl/http://127.0.0.1:1/x.tif",
        "",
    ]
)


@st.composite
def acquisition_messages(draw: st.DrawFn, rig: Rig) -> bytes:
    """A STAC payload naming a mutated tile, an odd href, or any payload at all."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        mutant: Mutant | None = draw(st.one_of(mutants(), st.none()))
        data = base_tiles()[draw(st.sampled_from(sorted(base_tiles())))] if mutant is None else mutant.data
        href = rig.put("D033/fuzz-{n}.tif", data)
        return json.dumps({**STAC, "assets": {"data": {**STAC["assets"]["data"], "href": href}}}).encode()
    if choice == 1:
        document = {
            **STAC,
            "id": f"D033-h{rig.count}",
            "assets": {"data": {**STAC["assets"]["data"], "href": draw(HREFS)}},
        }
        return json.dumps(document).encode()
    return draw(payloads(STAC))


def states(valid: dict[str, object], max_depth: int | None = None) -> st.SearchStrategy[bytes | None]:
    """A region's stored state: none yet, the valid one, the valid one broken (down to ``max_depth``), or garbage."""
    return st.one_of(
        st.none(),
        st.just(json.dumps(valid).encode()),
        broken(valid, max_depth=max_depth).map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
    )


@settings(max_examples=examples(150))
@given(data=st.data())
def test_any_acquisition_message_ends_as_a_prediction_or_a_typed_dead_letter(rig: Rig, data: st.DataObject) -> None:
    payload = data.draw(acquisition_messages(rig), label="payload")
    key = data.draw(keys("D033"), label="key")
    # broken at the top level only: a wrong type deep inside the monitor's state is a known bug of
    # RegionMonitor.load_state_dict (see test_a_region_state_with_a_wrong_type_inside_the_monitor below)
    state = data.draw(states(rig.region_state, max_depth=1), label="state")
    outcome = rig.pipeline.process(payload, key, state)
    _check(outcome, payload, {"predictions", "features", "drift_events", "adaptation_jobs"})
    if outcome.messages and outcome.messages[0].topic != "deadletter":
        assert outcome.state is not None


# == delayed labels ================================================================================================
LABEL = json.loads(LabelRecord(acquisition_id="D033-00000", region="D033", href="memory://acquisitions/x").to_json())


@st.composite
def label_messages(draw: st.DrawFn, rig: Rig) -> bytes:
    choice = draw(st.integers(0, 3))
    acquisition = draw(st.sampled_from(["D033-00000", "D033-00001", "D033-00002", "D033-none"]))
    if choice == 0:
        mask: Mutant | None = draw(st.one_of(mutants(masks=True), st.just(None)))
        data = mask_tiles()["mask-strips"] if mask is None else mask.data
        href = rig.put("D033/labels/fuzz-{n}.tif", data)
        encoding: Literal["classes", "flair19"] = draw(st.sampled_from(["classes", "flair19"]))
        return LabelRecord(acquisition_id=acquisition, region="D033", href=href, encoding=encoding).to_json()
    if choice == 1:  # the acquisition's own image as a label: 5 bands, not a mask
        return LabelRecord(acquisition_id=acquisition, region="D033", href=draw(HREFS)).to_json()
    return draw(payloads(LABEL))


@settings(max_examples=examples(150))
@given(data=st.data())
def test_any_label_message_ends_joined_or_as_a_typed_dead_letter(rig: Rig, data: st.DataObject) -> None:
    payload = data.draw(label_messages(rig), label="payload")
    key = data.draw(keys("D033"), label="key")
    state = data.draw(states(rig.label_state), label="state")
    outcome = rig.pipeline.process_label(payload, key, state)
    _check(outcome, payload, {"adaptation_jobs"})


# == adaptation jobs ===============================================================================================
DRIFT = DriftEvent(
    region="D013", acquisition_id="D013-00002", tiles_seen=3, signal="radiometry", score=9.0, threshold=1.0
)
JOB = json.loads(
    AdaptationJob(
        job_id="adapt-fuzz",
        region="D013",
        base_version=0,
        method="bn",
        tile_ids=("D013-00000", "D013-00001", "D013-00002"),
        tile_hrefs=tuple(f"memory://acquisitions/D013/D013-0000{i}.tif" for i in range(3)),
        trigger=DRIFT,
    ).to_json()
)


@st.composite
def job_messages(draw: st.DrawFn, rig: Rig) -> bytes:
    """Jobs over valid, mutated and missing tiles, odd versions and label lists; or any payload at all."""
    if draw(st.integers(0, 2)) == 0:
        return draw(payloads(JOB))
    hrefs = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            hrefs.append(rig.put("D013/fuzz-{n}.tif", draw(mutants(max_steps=2)).data))
        else:
            hrefs.append(draw(st.sampled_from([*JOB["tile_hrefs"], "memory://acquisitions/D013/gone.tif"])))
    job = {
        **JOB,
        "job_id": f"fuzz-{draw(st.integers(0, 3))}",
        "base_version": draw(st.sampled_from([0, 0, 1, 2, -1, 2**40])),
        "tile_ids": [f"D013-f{i}" for i in range(len(hrefs))],
        "tile_hrefs": hrefs,
        "labels": draw(st.lists(st.sampled_from(["D013-00000", "D033-00001", "nope"]), max_size=2)),
        "label_shift": draw(st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=0, max_size=14))),
    }
    return json.dumps(draw(st.one_of(st.just(job), broken(job, max_changes=1)))).encode()


@settings(max_examples=examples(60), deadline=timedelta(seconds=60))
@given(data=st.data())
def test_any_job_message_ends_published_or_as_a_typed_dead_letter(rig: Rig, data: st.DataObject) -> None:
    payload = data.draw(job_messages(rig), label="payload")
    key = data.draw(keys("D013"), label="key")
    outcome = rig.pipeline.run_job(payload, key)
    _check(outcome, payload, {"model_versions", "rollouts"})


def test_the_fuzz_bases_are_what_the_worker_accepts(rig: Rig) -> None:
    for name, data in base_tiles().items():
        href = rig.put(f"D033/{name}-{{n}}.tif", data)
        payload = json.dumps(
            {**STAC, "id": f"D033-{name}", "assets": {"data": {**STAC["assets"]["data"], "href": href}}}
        )
        topics = [m.topic for m in rig.pipeline.process(payload.encode(), "D033", None).messages]
        assert topics[:2] == ["predictions", "features"], name


@pytest.mark.parametrize(
    "state",
    [
        b"\xe7garbage",  # JSONDecodeError (a UnicodeDecodeError) escaped process_label as internal_error
        b'{"num_classes": 13, "window": 50, "windows": [{"region": "D033", "version": 0, '
        b'"tiles": [1]}], "pending": []}',  # ValueError: a confusion matrix that is not 13 x 13
        b'{"num_classes": 13, "window": 50, "windows": [{"region": "D033", "version": 0, '
        b'"tiles": [9223372036854775808]}], "pending": []}',  # OverflowError (found by make fuzz)
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError
    ],
    ids=["not-json", "wrong-shape", "int-overflow", "deep-nesting"],
)
def test_an_unreadable_label_state_starts_the_accuracy_afresh(rig: Rig, state: bytes) -> None:
    # as an unreadable region state does for acquisitions: a stuck region is worse than a fresh window
    href = rig.put("D033/labels/{n}.tif", mask_tiles()["mask-strips"])
    payload = LabelRecord(acquisition_id="D033-00001", region="D033", href=href).to_json()
    outcome = rig.pipeline.process_label(payload, "D033", state)
    assert "deadletter" not in [m.topic for m in outcome.messages] and outcome.state is not None
    windows = json.loads(outcome.state)["windows"]
    assert [(w["region"], len(w["tiles"])) for w in windows] == [("D033", 1)]


def test_a_region_state_with_a_wrong_type_inside_the_monitor_starts_the_region_afresh(rig: Rig) -> None:
    state = json.loads(json.dumps(rig.region_state))
    state["monitor"]["detected_at"] = []  # found by make fuzz: an int or null when written by the pipeline
    href = "memory://acquisitions/D033/D033-00001.tif"
    payload = json.dumps({**STAC, "id": "D033-state", "assets": {"data": {**STAC["assets"]["data"], "href": href}}})
    outcome = rig.pipeline.process(payload.encode(), "D033", json.dumps(state).encode())
    assert [m.topic for m in outcome.messages] == ["predictions", "features"], [
        getattr(m.record, "error", "") for m in outcome.messages
    ]
