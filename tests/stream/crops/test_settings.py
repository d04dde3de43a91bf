"""The ``[crops]`` settings: typed, unknown keys rejected, and ``TERRADAPT_CROPS__*`` changes what the loop does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from stream.config import ConfigError
from stream.crops.config import CropLoopConfig
from stream.crops.demo import source_registry
from stream.crops.runner import CropLoop
from terradapt.crops.synthetic import COUNTRIES, generate_country
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
