"""The ``[crops]`` settings: typed, unknown keys rejected, and ``TERRADAPT_CROPS__*`` changes what the loop does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from monitoring.metrics import ServiceMetrics
from serving.crop_registry import CropRegistry
from serving.store import MemoryReader, MemoryStore
from stream.config import ConfigError
from stream.crops.bootstrap import init_crop_registry
from stream.crops.config import CropLoopConfig
from stream.crops.demo import source_registry, stream_items
from stream.crops.runner import CropLoop
from stream.crops.steps import CropSteps
from stream.kafka.services import CropServices
from stream.kafka.worker import Batching, Route, crop_routes
from stream.topics import Topics
from terradapt.crops.stream_records import ParcelLabel
from terradapt.crops.synthetic import COUNTRIES, generate_country
from terradapt.records import DeadLetter
from tests.fakes.crops import SOURCES, source_model, source_parcels


def test_env_variables_reach_the_crop_settings(env) -> None:
    settings = env(CROPS__METHOD="bn", CROPS__MONITOR__ERT="5000", CROPS__TRIGGER__MIN_TILES="48")
    assert settings.crops.method == "bn"
    assert settings.crops.monitor.ert == 5000
    assert settings.crops.trigger.min_tiles == 48
    assert env().crops.method == "phenology-bn"


@pytest.mark.parametrize(
    "variables",
    [{"CROPS__NOPE": "1"}, {"CROPS__METHOD": "sar"}, {"CROPS__MONITOR__SIGNALS": '["deep"]'}],
)
def test_bad_crop_settings_are_rejected(env, variables: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        env(**variables)


def test_config_rejects_unknown_keys_and_impossible_sizes() -> None:
    with pytest.raises(ValidationError, match="extra"):
        CropLoopConfig.model_validate({"batch": 3})
    with pytest.raises(ValidationError, match="gate_parcels"):
        CropLoopConfig(buffer_parcels=32, gate_parcels=32)
    with pytest.raises(ValidationError, match="min_tiles"):
        CropLoopConfig.model_validate({"buffer_parcels": 32, "gate_parcels": 8, "trigger": {"min_tiles": 64}})


def _lv_run(settings_crops: CropLoopConfig, root: Path) -> tuple[CropLoop, list[int]]:
    torch.set_num_threads(1)
    registry = source_registry(root, source_model(), source_parcels())
    calibration = [p for r in SOURCES for p in generate_country(COUNTRIES[r], 64, seed=4)]
    loop = CropLoop(settings_crops, registry, calibration)
    result = loop.run(generate_country(COUNTRIES["lv-1"], 112, seed=2))
    return loop, result.published("lv-1")


def test_method_and_trigger_settings_change_the_loop(env, tmp_path: Path) -> None:
    default, versions = _lv_run(env().crops, tmp_path / "a")
    assert versions and default.pipeline.registry.manifest("lv-1", versions[0]).method == "phenology-bn"
    bn, bn_versions = _lv_run(env(CROPS__METHOD="bn").crops, tmp_path / "b")
    assert bn.result.adaptations and {a.method for a in bn.result.adaptations} == {"bn"}
    for v in bn_versions:
        assert bn.pipeline.registry.manifest("lv-1", v).method == "bn"
    # the trigger waits for min_tiles buffered parcels: the first job starts later
    late, _ = _lv_run(env(CROPS__TRIGGER__MIN_TILES="96", CROPS__BUFFER_PARCELS="96").crops, tmp_path / "c")
    assert late.result.first_detection["lv-1"] == default.result.first_detection["lv-1"]
    assert default.result.adaptations[0].parcels_seen == 64
    assert late.result.adaptations[0].parcels_seen == 96


def test_worker_settings_reach_the_crop_worker_calls(env, tmp_path: Path) -> None:
    """``stream.regions``, ``kafka.topic_prefix`` and ``crops.label_window`` through ``TERRADAPT_*``."""
    torch.set_num_threads(1)
    seeded = source_registry(tmp_path / "seed", source_model(), source_parcels())
    registry = CropRegistry(MemoryStore("models"))
    calibration = [p for r in SOURCES for p in generate_country(COUNTRIES[r], 64, seed=4)]
    weights = seeded._stored_weights("source", 0)
    init_crop_registry(registry, weights, seeded.manifest("source", 0), calibration, CropLoopConfig())
    objects = MemoryStore("series")
    parcels = generate_country(COUNTRIES["lv-1"], 4, seed=2)
    items = stream_items(objects, parcels, "LV")

    def steps(**variables: str) -> CropSteps:
        return CropSteps.from_settings(env(**variables), registry, MemoryReader(objects), MemoryStore("predictions"))

    served = steps(STREAM__REGIONS='["fr-2"]', KAFKA__TOPIC_PREFIX="x.")
    (outcome,) = served.process_many([(items[0].to_json(), "lv-1", None)])
    (letter,) = outcome.of(DeadLetter)
    assert letter.reason == "unknown_region" and letter.topic == "x.crop-series"
    (outcome,) = steps().process_many([(items[0].to_json(), "lv-1", None)])
    assert not outcome.of(DeadLetter)

    def window(crops: CropSteps) -> int:
        crops.process_many([(i.to_json(), "lv-1", None) for i in items])
        state: bytes | None = None
        for item, parcel in zip(items, parcels, strict=True):
            label = ParcelLabel(acquisition_id=item.id, region="lv-1", label=parcel.label).to_json()
            state = crops.process_label(label, "lv-1", state).state
        assert state is not None
        (w,) = json.loads(state)["windows"]
        return len(w["tiles"])

    assert window(steps(CROPS__LABEL_WINDOW="2")) == 2
    assert window(steps()) == 4


def test_crops_batch_parcels_sets_the_crop_workers_batches(env) -> None:
    calls = SimpleNamespace(process_many=list, process_label=list)  # the routes only name them

    def series_route(**variables: str) -> Route:
        settings = env(**variables)
        services = CropServices(settings, calls, Topics.with_prefix("t."), ServiceMetrics(CollectorRegistry()))  # type: ignore[arg-type]
        return crop_routes(services)[0]

    route = series_route(CROPS__BATCH_PARCELS="8", STREAM__BATCH_WAIT_MS="5")
    assert route.topic == "t.crop-series" and route.batching == Batching(8, 0.005)
    assert series_route().batching.max_messages == 16
