"""The runner's settings: every layer's small config composed, from a TOML file and ``TERRADAPT_*`` variables.

Environment variables name a section and a field with a double underscore, e.g. ``TERRADAPT_KAFKA__BOOTSTRAP``,
``TERRADAPT_S3__ACCESS_KEY``, ``TERRADAPT_ADAPTATION__METHOD``. Unknown keys are errors, in files and in the
environment, and the message lists what is accepted. Variables with a single underscore belong to the service
scripts (``TERRADAPT_RUN_DIR``, ``TERRADAPT_KAFKA_PORT``...) and are not settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from adapters.job import AdaptationConfig
from adapters.trigger import TriggerConfig
from monitoring.monitor import MonitorConfig
from terradapt.settings import KafkaConfig, RuntimeConfig, S3Config, StrictModel, TorchServeConfig, read_toml

ENV_PREFIX = "TERRADAPT_"
ENV_DELIMITER = "__"


class ConfigError(ValueError):
    """Settings that cannot be accepted (unknown key, bad value); the message names the key."""


class StreamConfig(StrictModel):
    """Stream worker behaviour."""

    app_id: str = "terradapt"
    regions: tuple[str, ...] = Field(default=(), description="regions served; empty = any valid region code")
    max_tile_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_tile_pixels: int = Field(default=64_000_000, ge=1024)
    buffer_tiles: int = Field(default=16, ge=1, description="recent tiles kept per region for adaptation")
    predict_retries: int = Field(default=3, ge=0)
    band_count: int | None = 5
    expected_crs: str | None = "EPSG:2154"


class MetricsConfig(StrictModel):
    """Prometheus exposition of a worker (0 = off)."""

    port: int = Field(default=0, ge=0, le=65535)
    addr: str = "127.0.0.1"


class PrometheusConfig(StrictModel):
    """Where the Prometheus server is (dashboards, tests)."""

    url: str = "http://127.0.0.1:19090"


class Settings(BaseSettings):
    """All terradapt settings. Field names match the constructor arguments of the pieces they configure."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="forbid", frozen=True
    )

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    s3: S3Config = Field(default_factory=S3Config)
    torchserve: TorchServeConfig = Field(default_factory=TorchServeConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment variables override the file's values (passed as init kwargs)."""
        return env_settings, init_settings


def _check_env(environ: dict[str, str]) -> None:
    sections = Settings.model_fields
    for key in environ:
        if not key.startswith(ENV_PREFIX) or ENV_DELIMITER not in key:
            continue
        section, _, field = key[len(ENV_PREFIX) :].lower().partition(ENV_DELIMITER)
        if section not in sections:
            raise ConfigError(f"unknown setting {key}: sections are {', '.join(sorted(sections))}")
        annotation = sections[section].annotation
        fields = getattr(annotation, "model_fields", {})
        name = field.split(ENV_DELIMITER)[0]
        if name not in fields:
            raise ConfigError(f"unknown setting {key}: fields of [{section}] are {', '.join(sorted(fields))}")


def load_settings(path: Path | None = None) -> Settings:
    """Settings from an optional TOML file (``TERRADAPT_CONFIG`` when ``path`` is None), then the environment."""
    _check_env(dict(os.environ))
    env_file = os.environ.get("TERRADAPT_CONFIG")
    file = path or (Path(env_file) if env_file else None)
    data: dict[str, Any] = read_toml(file) if file else {}
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings{f' in {file}' if file else ''}: {problems}") from exc
