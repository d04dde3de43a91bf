"""Faults on the real services: a broker, MinIO, the adaptation worker, one of two stream workers SIGKILLed.

After each fault the stack must end where an uninterrupted run ends: every acquisition still on its topic and
with exactly one prediction object, no model version registered twice, and per-region decisions (drift events,
adaptation jobs, the stored monitor state) identical to a reference run of the same ordered per-region stream
through the same pipeline in this process (``stream.build.build_pipeline``, no transport), after replays are
de-duplicated.

Why an exact comparison is possible: a region's decisions are a function of its ordered tiles and of the model
version that predicted them. Each region's stream here ends at the tile that issues its adaptation job (found by
the reference run), so every tile that counts is predicted by the source model whenever the adaptation worker
rolls the new version out. Floats are compared to 1e-6 relative (the reference runs in this process, the workers
in theirs; both on the CPU); every discrete decision exactly.

Every wait is on an event (a log line, a message, a marker file), never on a delay or on which process is faster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka.partitioner.default import murmur2

from serving.registry import ModelRegistry
from serving.store import MemoryReader, MemoryStore
from stream.bootstrap import bootstrap_registry
from stream.build import build_pipeline
from stream.config import Settings, load_settings
from stream.kafka.ingest import acquisition_for
from stream.kafka.worker import unpack_state
from stream.pipeline import Pipeline
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest
from terradapt.records import Acquisition, AdaptationJob, DriftEvent
from tests.stream.kafka.paused_adapt_worker import MARKER_ENV
from tests.stream.kafka.private_services import PrivateServices
from tests.stream.kafka.stack import Stack, prediction_keys

pytestmark = pytest.mark.services

PARTITIONS = 4
#: a short replay window (the pipeline's ``RegionState.seen`` spans ``buffer_tiles``) and a job after 8 tiles: short
#: streams, and a crash replay easily longer than the window (the worker must not count it twice)
ENV = {
    "TERRADAPT_KAFKA__PARTITIONS": str(PARTITIONS),
    "TERRADAPT_STREAM__BUFFER_TILES": "8",
    "TERRADAPT_TRIGGER__MIN_TILES": "8",
}
SHIFTED = "D013"
#: in-distribution regions streaming D033 tiles (ids differ: an acquisition id is region + content hash); with the
#: shifted one their keys land on the four partitions, so two workers of one group both get regions
QUIET = ("D044", "D046", "D050")
QUIET_TILES = 4
#: predictions observed before a fault is injected ("mid-stream")
K = 6
PROCESSED = "processed acquisition"
READY = "Worker ready"  # faust logs it once its partitions are assigned and its tables recovered


def _partition(region: str) -> int:
    return int(murmur2(region.encode()) & 0x7FFFFFFF) % PARTITIONS


# -- the reference: the same ordered per-region stream through the same pipeline, in this process ---------------
@dataclass(frozen=True)
class Decisions:
    """What a run decided, transport-free: drift events, adaptation jobs and final monitor state per region."""

    drift: dict[tuple[str, str], dict[str, Any]]
    jobs: dict[str, dict[str, Any]]
    states: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    """The stream every fault test sends (region -> ordered tiles) and what an uninterrupted run decides on it."""

    stream: dict[str, list[Path]]
    expected: Decisions

    @property
    def total(self) -> int:
        """Acquisitions in the whole stream."""
        return sum(len(p) for p in self.stream.values())

    def half(self, which: int) -> dict[str, list[Path]]:
        """The first (0) or second (1) half of every region's tiles: a fault lands between them, mid-stream."""
        return {r: p[: len(p) // 2] if which == 0 else p[len(p) // 2 :] for r, p in self.stream.items()}


def _drift(d: DriftEvent | dict[str, Any]) -> dict[str, Any]:
    rec = d if isinstance(d, dict) else json.loads(d.to_json())
    return {k: v for k, v in rec.items() if k not in {"detected_at", "schema_version"}}


def _job(j: AdaptationJob | dict[str, Any]) -> dict[str, Any]:
    rec = j if isinstance(j, dict) else json.loads(j.to_json())
    # hrefs name the run's bucket; ids, versions, method and the trigger are the decision
    drop = {"tile_hrefs", "created", "schema_version"}
    return {**{k: v for k, v in rec.items() if k not in drop}, "trigger": _drift(rec["trigger"])}


def _state(raw: bytes) -> dict[str, Any]:
    state = json.loads(unpack_state(raw).state)  # a worker's table value (the reference's bytes pass as they are)
    state["recent"] = [tile_id for tile_id, _href in state["recent"]]
    return dict(state)


def _settings() -> Settings:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**ENV, "TERRADAPT_RUNTIME__DEVICE": "cpu"}.items():
            mp.setenv(key, value)
        return load_settings()


def _run_region(
    pipeline: Pipeline, objects: MemoryStore, region: str, paths: list[Path], *, until_job: bool = False
) -> tuple[int, Decisions]:
    """Feed one region's tiles in order; return how many were fed and what was decided."""
    drift: dict[tuple[str, str], dict[str, Any]] = {}
    jobs: dict[str, dict[str, Any]] = {}
    state: bytes | None = None
    fed = 0
    for path in paths:
        data = path.read_bytes()
        acq = acquisition_for(data, region, objects.put(f"{region}/{path.name}", data, "image/tiff"))
        outcome = pipeline.process(acq.to_json(), region, state)
        assert outcome.state is not None, outcome
        state = outcome.state
        fed += 1
        for m in outcome.messages:
            if isinstance(m.record, DriftEvent):
                drift[(region, m.record.acquisition_id)] = _drift(m.record)
            elif isinstance(m.record, AdaptationJob):
                jobs[m.record.job_id] = _job(m.record)
        if until_job and jobs:
            break
    assert state is not None
    return fed, Decisions(drift, jobs, {region: _state(state)})


@pytest.fixture(scope="module")
def plan(source_checkpoint: tuple[Path, list[np.ndarray]], tiles: dict[str, list[Path]]) -> Plan:
    """One reference computation for every fault test of this module."""
    assert len({_partition(r) for r in (SHIFTED, *QUIET)}) == PARTITIONS, "regions must cover every partition"
    checkpoint, images = source_checkpoint
    registry = ModelRegistry(MemoryStore("models"))
    manifest = ModelManifest.model_validate_json((checkpoint / MANIFEST_FILE).read_bytes())
    bootstrap_registry(registry, (checkpoint / WEIGHTS_FILE).read_bytes(), manifest, images, device="cpu")
    objects = MemoryStore("acquisitions")
    pipeline = build_pipeline(_settings(), registry=registry, reader=MemoryReader(objects), predictions=None)
    # the shifted region streams up to the tile that issues its job: every tile that counts is predicted by the
    # source model, wherever the adaptation worker's rollout lands
    fed, shifted = _run_region(pipeline, objects, SHIFTED, tiles[SHIFTED], until_job=True)
    assert shifted.jobs and shifted.drift, "the shifted stream issued no adaptation job: the fixture changed"
    stream = {SHIFTED: tiles[SHIFTED][:fed]}
    parts = [shifted]
    for i, region in enumerate(QUIET):
        stream[region] = tiles["D033"][i * QUIET_TILES : (i + 1) * QUIET_TILES]
        parts.append(_run_region(pipeline, objects, region, stream[region])[1])
    expected = Decisions(
        drift={k: v for p in parts for k, v in p.drift.items()},
        jobs={k: v for p in parts for k, v in p.jobs.items()},
        states={k: v for p in parts for k, v in p.states.items()},
    )
    return Plan(stream, expected)


# -- comparing a Kafka run with the reference --------------------------------------------------------------------
def _close(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON values differ; empty if they agree.

    Floats to 1e-5 relative or absolute: float32 sums vary with the thread split and with the batch a tile was
    predicted in (the worker batches, the reference does not); decisions (counts, flags, indices) are exact.
    """
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return [] if a == b else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return [] if math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _close(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _dedupe(records: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, Any]]:
    """One record per key; a replay may publish a record twice, but never a different one."""
    out: dict[Any, dict[str, Any]] = {}
    for rec in records:
        k = key(rec)
        if k in out:
            assert not _close(out[k], rec), f"replayed record differs from the first one: {_close(out[k], rec)}"
        out[k] = rec
    return out


def _assert_decisions_match(stack: Stack, plan: Plan) -> None:
    """Drift events, jobs and every region's final stored monitor state equal the uninterrupted reference's."""
    expected = plan.expected
    seen = {r: len(p) for r, p in plan.stream.items()}

    def states_final(_: list[dict[str, Any]]) -> bool:  # the changelog may trail the last prediction message
        table = stack.table("monitors")
        return all(r in table and _state(table[r])["monitor"]["tiles_seen"] == n for r, n in seen.items())

    stack.wait_for("predictions", states_final, timeout_s=120)
    drift = _dedupe([_drift(d) for d in stack.read("drift_events")], lambda d: (d["region"], d["acquisition_id"]))
    assert sorted(drift) == sorted(expected.drift), (sorted(drift), sorted(expected.drift))
    for k, want in expected.drift.items():
        assert not _close(drift[k], want), (k, _close(drift[k], want))
    jobs = _dedupe([_job(j) for j in stack.read("adaptation_jobs")], lambda j: j["job_id"])
    assert sorted(jobs) == sorted(expected.jobs)
    for job_id, job in expected.jobs.items():
        assert not _close(jobs[job_id], job), (job_id, _close(jobs[job_id], job))
    table = {r: _state(v) for r, v in stack.table("monitors").items()}
    assert sorted(table) == sorted(expected.states)
    for region, want in expected.states.items():
        assert not _close(table[region], want), (region, _close(table[region], want)[:10])


def _ingest(stack: Stack, stream: dict[str, list[Path]]) -> list[Acquisition]:
    return [a for region, paths in stream.items() for a in stack.ingest(paths, region)]


def _assert_nothing_lost(stack: Stack, plan: Plan, acqs: list[Acquisition], *, adapted: bool = True) -> None:
    """Every acquisition on its topic with one prediction object; versions once each; decisions as the reference."""
    ids = {a.id for a in acqs}
    assert len(ids) == plan.total
    preds = stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=240)
    assert {p["acquisition_id"] for p in preds} == ids
    assert {m["id"] for m in stack.read("acquisitions")} == ids, "an acquisition is missing from its topic"
    assert stack.predictions.list("") == prediction_keys(acqs)
    assert not stack.read("deadletter")
    _assert_decisions_match(stack, plan)
    if adapted:
        _assert_versions_once(stack, plan)


def _assert_versions_once(stack: Stack, plan: Plan) -> None:
    """Every expected job made exactly one version (registry and topic), and accepted ones are rolled out."""
    jobs = plan.expected.jobs
    msgs = stack.wait_for("model_versions", lambda m: {v["job_id"] for v in m} >= set(jobs), timeout_s=240)
    for region in plan.stream:
        history = stack.registry.history(region)
        want = sorted(j for j, job in jobs.items() if job["region"] == region)
        assert sorted(m.job_id or "" for m in history) == want, (region, [(m.version, m.job_id) for m in history])
        assert len({m.version for m in history}) == len(history)
    assert len({(v["region"], v["version"], v["job_id"]) for v in msgs}) == len(jobs), msgs
    accepted = {(v["region"], v["version"]) for v in msgs if v["accepted"]}
    if accepted:
        rollouts = stack.wait_for(
            "rollouts", lambda m: {(r["region"], r["version"]) for r in m if r["step"] == "promoted"} >= accepted
        )
        assert {(r["region"], r["version"]) for r in rollouts if r["step"] == "promoted"} == accepted
        for region, version in accepted:
            assert stack.registry.current(region) == version


# -- the faults -------------------------------------------------------------------------------------------------
def _private(root: Path, name: str) -> Iterator[PrivateServices]:
    services = PrivateServices(root, (name,))
    services.up()
    try:
        yield services
    finally:
        services.down()


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[PrivateServices]:
    yield from _private(tmp_path / "services", "kafka")


@pytest.fixture
def private_minio(tmp_path: Path) -> Iterator[PrivateServices]:
    yield from _private(tmp_path / "services", "minio")


def test_broker_sigkill_mid_stream_and_restart_loses_nothing(private_kafka, make_stack, plan):
    stack = make_stack({**ENV, **private_kafka.client_env()})
    stack.start("worker", "worker")
    stack.start("adapt", "adapt-worker")
    acqs = _ingest(stack, plan.half(0))
    stack.wait_for_log_count("worker", PROCESSED, K, timeout_s=180)  # mid-stream: k done, the rest still to come
    private_kafka.kill("kafka")  # the worker is most likely still busy with the first half: records in flight
    private_kafka.up("kafka")
    acqs += _ingest(stack, plan.half(1))
    _assert_nothing_lost(stack, plan, acqs)


def _upload(stack: Stack, stream: dict[str, list[Path]]) -> list[Acquisition]:
    """Store the objects of ``stream`` and return their acquisitions, unannounced (what ``ingest`` would publish)."""
    acqs = []
    for region, paths in stream.items():
        for path in paths:
            data = path.read_bytes()
            acq = acquisition_for(data, region, "s3://placeholder/x")
            href = stack.acquisitions.put(f"{region}/{acq.id}.tif", data, "image/tiff")
            acqs.append(acquisition_for(data, region, href))
    return acqs


def test_minio_sigkill_mid_stream_and_restart_loses_nothing(private_minio, make_stack, plan):
    stack = make_stack({**ENV, **private_minio.client_env()})
    stack.start("worker", "worker")
    stack.start("adapt", "adapt-worker")
    acqs = _ingest(stack, plan.half(0))
    later = _upload(stack, plan.half(1))  # stored now, announced during the outage
    stack.wait_for_log_count("worker", PROCESSED, K, timeout_s=180)
    private_minio.kill("minio")
    for acq in later:  # the worker must read these while MinIO is away
        stack.send_raw(acq.region, acq.to_json())
    # the outage outlasts the MinIO client's own retries (~6 s): the worker's storage retry has reported it, so a
    # tile is being held (not dead-lettered) while MinIO is down; only then does MinIO come back
    stack.wait_for_log("worker", "storage unavailable", timeout_s=180)
    private_minio.up("minio")
    _assert_nothing_lost(stack, plan, acqs + later)


def test_adapt_worker_sigkill_between_publish_and_rollout(make_stack, plan, tmp_path):
    stack = make_stack(ENV)
    marker = tmp_path / "paused.json"
    stack.start("worker", "worker")
    stack.start_module("adapt", "tests.stream.kafka.paused_adapt_worker", {MARKER_ENV: str(marker)})
    acqs = _ingest(stack, plan.stream)
    stack.wait_for("model_versions", lambda _: marker.exists(), timeout_s=240)  # published, rollout not done
    paused = json.loads(marker.read_text())
    region, version = paused["region"], paused["version"]
    assert [m.version for m in stack.registry.history(region)] == [version]
    assert stack.registry.current(region) == 0
    stack.kill("adapt")
    assert not stack.read("rollouts") and not stack.read("model_versions")  # the killed worker published nothing
    stack.start("adapt", "adapt-worker")
    _assert_nothing_lost(stack, plan, acqs)
    assert [m.version for m in stack.registry.history(region)] == [version]
    assert json.loads(stack.models.get(f"aliases/{region}.json"))["current"] == version
    versions = stack.read("model_versions")
    assert [(v["region"], v["version"]) for v in versions] == [(region, version)]


def test_one_of_two_stream_workers_sigkill_under_load(make_stack, plan):
    stack = make_stack(ENV)
    stack.start("adapt", "adapt-worker")
    stack.start("worker-a", "worker")
    stack.wait_for_log("worker-a", READY, timeout_s=180)
    stack.start("worker-b", "worker")
    stack.wait_for_log("worker-b", READY, timeout_s=180)  # both in the group, partitions shared, before the stream
    acqs = _ingest(stack, plan.half(0))
    workers = ("worker-a", "worker-b")

    def both_busy(_: list[dict[str, Any]]) -> bool:
        return all(stack.count_log(w, PROCESSED) > 0 for w in workers) and any(
            stack.count_log(w, f"{PROCESSED} {SHIFTED}") >= K // 2 for w in workers
        )

    stack.wait_for("predictions", both_busy, timeout_s=240)
    # the victim owns the long (shifted) region; frozen, it keeps its partitions while the rest of the stream
    # lands on them (load it will never process), then it is killed and its state must move to the survivor intact
    victim = next(w for w in workers if stack.count_log(w, f"{PROCESSED} {SHIFTED}") >= K // 2)
    survivor = next(w for w in workers if w != victim)
    stack.pause(victim)
    shifted_at_kill = stack.count_log(victim, f"{PROCESSED} {SHIFTED}")
    acqs += _ingest(stack, plan.half(1))
    stack.kill(victim)
    _assert_nothing_lost(stack, plan, acqs)
    assert shifted_at_kill < len(plan.stream[SHIFTED])
    assert f"{PROCESSED} {SHIFTED}" in stack.log_text(survivor), "the survivor never took the region over"
