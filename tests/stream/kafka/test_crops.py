"""Crop mapping end-to-end on the real Kafka broker and MinIO server: two countries, one shifted.

``terradapt crops init`` puts the source crop model and its calibration in MinIO; ``terradapt crops worker`` and
``terradapt crops adapt-worker`` run as processes. No step depends on how fast a worker is: the test waits for the
shifted country's model version, and only then streams the parcels that must be predicted by it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from serving.crop_registry import CropRegistry
from stream.crops.bootstrap import publish_series
from stream.crops.demo import FR2
from stream.crops.steps import prediction_key
from stream.kafka.worker import unpack_state
from terradapt.crops.breizhcrops import write_breizhcrops
from terradapt.crops.checkpoint import CropManifest, save_crop
from terradapt.crops.records import SeriesAcquisition
from terradapt.crops.series import S2_BANDS, ParcelSeries, encode_series
from terradapt.crops.stream_records import ParcelLabel
from terradapt.crops.synthetic import COUNTRIES, CROP_CLASSES, generate_country
from tests.fakes.crops import SOURCES, source_model, source_parcels, source_prior
from tests.stream.kafka.stack import TERRADAPT, Stack

pytestmark = pytest.mark.services

LV = COUNTRIES["lv-1"]


def crop_source(root: Path) -> tuple[Path, Path]:
    """A crop checkpoint folder and a folder of held-out source parcels (.npz), as a user would have them."""
    prior = source_prior()
    manifest = CropManifest(
        config={},
        classes=CROP_CLASSES,
        bands=S2_BANDS,
        training_regions=tuple(sorted({p.region for p in source_parcels()})),
        class_prior=tuple(float(v) for v in prior / prior.sum()),
    )
    model_dir = root / "crop-model"
    save_crop(model_dir, source_model(), manifest)
    calibration = root / "calibration"
    calibration.mkdir()
    for p in (p for r in SOURCES for p in generate_country(COUNTRIES[r], 64, seed=4)):
        (calibration / f"{p.region}_{p.parcel_id}.npz").write_bytes(encode_series(p))
    return model_dir, calibration


def crops_init(stack: Stack, model_dir: Path, calibration: Path, *, parcels: int) -> None:
    """`terradapt crops init` as a user runs it; it must report calibrating on ``parcels`` parcels."""
    init = subprocess.run(
        [TERRADAPT, "crops", "init", "--model", str(model_dir), "--calibration", str(calibration)],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    assert f"calibrated on {parcels} parcels" in " ".join(init.stdout.split())  # rich wraps at the terminal width


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """An isolated stack whose models bucket holds the source crop model and its calibration (`crops init`)."""
    torch.set_num_threads(1)
    stack = Stack(tmp_path / "stack")
    stack.root.mkdir(parents=True, exist_ok=True)
    try:
        model_dir, calibration = crop_source(tmp_path)
        crops_init(stack, model_dir, calibration, parcels=128)
        yield stack
    finally:
        stack.stop_all()


def publisher(stack: Stack) -> Callable[[list[ParcelSeries], str], list[SeriesAcquisition]]:
    """Publish series like `terradapt crops ingest` (objects first, then their items), failing on any refusal."""

    def publish(parcels: list[ParcelSeries], country: str) -> list[SeriesAcquisition]:
        report = publish_series(
            parcels, country=country, store=stack.acquisitions, producer=stack.producer, topic=stack.topics.crop_series
        )
        assert not report.refused
        return report.published

    return publish


def stored_counts(stack: Stack) -> dict[str, int]:
    """Parcels each region's stored crop state has counted (the crop worker's table, as its changelog leaves it)."""
    changelog = f"{stack.settings.stream.app_id}-crops-worker-monitors-changelog"
    last = {json.loads(k): v for k, v in stack.read_keyed(changelog, timeout_s=1.0) if v is not None}
    return {region: json.loads(unpack_state(v).state)["parcels"] for region, v in last.items()}


def wait_for_counts(stack: Stack, expected: dict[str, int], timeout_s: float = 120.0) -> None:
    """Wait until the stored states count ``expected`` (a state is written after its records, so it may lag)."""
    deadline = time.monotonic() + timeout_s
    while (counts := stored_counts(stack)) != expected:
        assert time.monotonic() < deadline, f"stored parcel counts {counts}, expected {expected}"
        time.sleep(0.5)


def test_two_countries_one_shifted_end_to_end(stack: Stack, tmp_path: Path) -> None:
    registry = CropRegistry(stack.models)
    assert registry.calibration()["profile"].shape[0] == 128
    stack.start_argv("crops", [TERRADAPT, "crops", "worker"])
    stack.start_argv("crops-adapt", [TERRADAPT, "crops", "adapt-worker"])
    topic = stack.topics.crop_series
    publish = publisher(stack)

    fr = publish(generate_country(FR2, 160, seed=2), "FR")
    lv = publish(generate_country(LV, 96, seed=2), "LV")  # drift at 16 parcels, a job at 64 buffered
    # hostile input: not JSON, and an item whose object is not an .npz
    stack.producer.send(topic, key=b"lv-1", value=b"{not a series").get(timeout=30)
    corrupt = lv[0].model_copy(update={"id": "lv-1_corrupt", "href": stack.acquisitions.put("lv-1/c.npz", b"nope")})
    stack.producer.send(topic, key=b"lv-1", value=corrupt.model_copy(update={"sha256": None}).to_json()).get(timeout=30)

    # the event that matters: the shifted country's adapted version ...
    versions = stack.wait_for("model_versions", lambda m: any(v["region"] == "lv-1" for v in m), timeout_s=420)
    # (sets: a redelivered job republishes its version, at-least-once)
    assert {(v["region"], v["version"], v["accepted"]) for v in versions} == {("lv-1", 1, True)}
    assert registry.current("lv-1") == 1 and registry.current("fr-2") == 0
    rollouts = stack.wait_for("rollouts", lambda m: len(m) >= 1)
    assert {(r["region"], r["version"], r["step"], r["previous"]) for r in rollouts} == {("lv-1", 1, "promoted", 0)}
    adapted, manifest = registry.load("lv-1")  # sha256-verified
    assert manifest.method == "phenology-bn" and manifest.parent == 0
    assert -40 <= float(adapted.date_offset) <= -15  # lv-1's season runs 32 days late
    # ... and only then the rest of its stream
    # through the command line: .npz files (parcel id = file name) uploaded and published by `terradapt crops ingest`
    labelled = generate_country(LV, 32, seed=3)
    files = []
    for n, parcel in enumerate(labelled):
        files.append(tmp_path / f"late-{n:03d}.npz")
        files[-1].write_bytes(encode_series(parcel))
    ingest = subprocess.run(
        [TERRADAPT, "crops", "ingest", *map(str, files), "--region", "lv-1", "--country", "LV"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    assert "32 series published" in " ".join(ingest.stdout.split())
    later = [f"lv-1_{f.stem}" for f in files]  # the series ids the command gave them

    ids = {s.id for s in fr + lv} | set(later)
    assert len(ids) == 160 + 96 + 32
    preds = stack.wait_for("crop_predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=300)
    # nothing lost: one prediction per series (a replay may repeat one), each stored where labels find it
    assert {p["acquisition_id"] for p in preds} == ids
    stored = {k for k in stack.predictions.list("crops/")}
    assert stored == {prediction_key(s.region, s.id) for s in fr + lv} | {prediction_key("lv-1", i) for i in later}
    by_id = {p["acquisition_id"]: p for p in preds}
    assert {by_id[i]["model_version"] for i in later} == {1}
    assert {by_id[s.id]["model_version"] for s in fr} == {0}

    # each country's stored state counts every series once
    wait_for_counts(stack, {"fr-2": 160, "lv-1": 96 + 32})

    # drift only for the shifted country; one job, handled once
    drift = stack.read("drift_events")
    assert {d["region"] for d in drift} == {"lv-1"} and all(d["covariate"] for d in drift)
    jobs = stack.read("crop_jobs")
    assert {(j["region"], j["job_id"], len(j["series"])) for j in jobs} == {("lv-1", "crops-lv-1_P000063", 64)}
    stack.wait_for_log("crops-adapt", "handled adaptation job of lv-1")

    # the dead letters: the payload kept whole with the reason; the worker went on
    letters = stack.wait_for("deadletter", lambda m: len(m) >= 2)
    assert {(d["reason"], d["key"]) for d in letters} == {("invalid_series", "lv-1"), ("malformed_payload", "lv-1")}
    assert all(d["topic"] == topic for d in letters)

    # delayed labels of the adapted country: joined with the stored predictions, per version
    for i, parcel in zip(later, labelled, strict=True):
        label = ParcelLabel(acquisition_id=i, region="lv-1", label=parcel.label)
        stack.producer.send(stack.topics.crop_labels, key=b"lv-1", value=label.to_json()).get(timeout=30)
    stack.wait_for_log_count("crops", "processed crop label lv-1", 32)
    changelog = f"{stack.settings.stream.app_id}-crops-worker-accuracy-changelog"
    values = [v for k, v in stack.read_keyed(changelog) if json.loads(k) == "lv-1"]
    windows = json.loads(unpack_state(values[-1]).state)["windows"]
    assert [(w["region"], w["version"], len(w["tiles"])) for w in windows] == [("lv-1", 1, 32)]
    correct = sum(by_id[i]["predicted"] == p.label for i, p in zip(later, labelled, strict=True))
    assert correct >= 24, f"adapted lv-1 version: {correct}/32 labelled parcels right"


def test_crop_worker_sigkill_mid_stream_loses_nothing_and_counts_once(stack: Stack) -> None:
    stack.start_argv("crops", [TERRADAPT, "crops", "worker"])
    publish = publisher(stack)
    series = publish(generate_country(FR2, 160, seed=2), "FR") + publish(generate_country(LV, 96, seed=2), "LV")
    ids = {s.id for s in series}
    # killed once it has predicted some of the stream (an event), restarted, and the stream goes on
    stack.wait_for("crop_predictions", lambda m: len(m) >= 40, timeout_s=180)
    stack.kill("crops")
    stack.start_argv("crops", [TERRADAPT, "crops", "worker"])
    preds = stack.wait_for("crop_predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=300)
    # at-least-once: a replay may publish a prediction twice, but each series is counted once and stored once
    assert {p["acquisition_id"] for p in preds} == ids
    assert set(stack.predictions.list("crops/")) == {prediction_key(s.region, s.id) for s in series}
    wait_for_counts(stack, {"fr-2": 160, "lv-1": 96})
    # the shifted country's job, however often its trigger message was replayed, is one job
    jobs = stack.wait_for("crop_jobs", lambda m: len(m) >= 1, timeout_s=60)
    assert {(j["region"], j["job_id"]) for j in jobs} == {("lv-1", "crops-lv-1_P000063")}


def test_crops_init_reads_held_out_parcels_in_the_breizhcrops_layout(tmp_path: Path) -> None:
    """`terradapt crops init --calibration` on a BreizhCrops-layout folder (parcel means: one pixel per date)."""
    stack = Stack(tmp_path / "stack")
    try:
        model_dir, _ = crop_source(tmp_path)
        layout = tmp_path / "breizhcrops"
        for n, region in enumerate(SOURCES, start=1):
            write_breizhcrops(layout, f"frh0{n}", generate_country(COUNTRIES[region], 40, seed=4), CROP_CLASSES)
        crops_init(stack, model_dir, layout, parcels=80)
        vectors = CropRegistry(stack.models).calibration()  # sha256- and source-weights-checked
        assert {name: v.shape[0] for name, v in vectors.items()} == dict.fromkeys(vectors, 80)
    finally:
        stack.stop_all()
