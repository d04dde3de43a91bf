"""The runner's settings: every layer's small config composed, from a TOML file and ``TERRADAPT_*`` variables.

Environment variables name a section and a field with a double underscore, e.g. ``TERRADAPT_KAFKA__BOOTSTRAP``,
``TERRADAPT_S3__ACCESS_KEY``, ``TERRADAPT_ADAPTATION__METHOD``. Unknown keys are errors, in files and in the
environment, and the message lists what is accepted. Variables with a single underscore belong to the service
scripts (``TERRADAPT_RUN_DIR``, ``TERRADAPT_KAFKA_PORT``...) and are not settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from adapters.config import AdaptationConfig
from adapters.trigger import TriggerConfig
from monitoring.monitor import MonitorConfig
from stream.crops.config import CropLoopConfig
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
    allowed_buckets: tuple[str, ...] | None = Field(
        default=None, description="buckets an acquisition's s3:// href may name; None = the acquisitions bucket"
    )
    file_root: Path | None = Field(
        default=None, description="folder file:// hrefs may read from (inside it only); None = file:// refused"
    )
    storage_retry_s: float = Field(
        default=120.0, ge=0, description="how long a storage call retries a transient outage before giving up"
    )
    max_tile_pixels: int = Field(default=64_000_000, ge=1024)
    max_decoded_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024, description="largest decoded raster (and internal block) from the header"
    )
    buffer_tiles: int = Field(default=16, ge=1, description="recent tiles kept per region for adaptation")
    predict_retries: int = Field(default=3, ge=0, description="retries of a transient predictor failure per tile")
    batch_max_tiles: int = Field(
        default=8, ge=1, le=1024, description="the worker predicts up to this many waiting acquisitions together"
    )
    batch_wait_ms: float = Field(
        default=20.0, ge=0, le=60_000, description="longest wait for a batch to fill once its first tile is there"
    )
    label_window: int = Field(default=50, ge=1, description="labelled tiles per (region, version) accuracy window")
    band_count: int | None = 5
    expected_crs: str | None = "EPSG:2154"


class IngestConfig(StrictModel):
    """``terradapt ingest``: how a run rides out a Kafka or object-store outage.

    A failing call is retried with exponential backoff and jitter while its failure looks transient, until
    ``deadline_s`` has passed since the outage's first failure; then the service counts as down for the rest of
    the run and the files it was needed for are reported unpublished (a re-run finishes them). An attempt in
    flight at the deadline may take up to ``attempt_timeout_s`` more.
    """

    deadline_s: float = Field(
        default=120.0, ge=0, description="longest wait for a service that stays unavailable; 0 = one attempt only"
    )
    attempt_timeout_s: float = Field(
        default=10.0, gt=0, description="one Kafka attempt: connect and bootstrap, topic metadata, acknowledgement"
    )
    backoff_initial_s: float = Field(default=0.5, gt=0, description="first delay between attempts")
    backoff_max_s: float = Field(default=10.0, gt=0, description="delays double up to this")
    jitter: float = Field(default=0.5, ge=0, le=1, description="each delay is drawn from [(1 - jitter) d, d]")

    @model_validator(mode="after")
    def _ordered(self) -> IngestConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s={self.backoff_max_s} < backoff_initial_s={self.backoff_initial_s}; "
                "accepted: backoff_max_s >= backoff_initial_s"
            )
        return self


class MetricsConfig(StrictModel):
    """Prometheus exposition of a worker (0 = off)."""

    port: int = Field(default=0, ge=0, le=65535)
    addr: str = "127.0.0.1"


class PrometheusConfig(StrictModel):
    """Where the Prometheus server is (dashboards, tests)."""

    url: str = "http://127.0.0.1:19090"


class DemoConfig(StrictModel):
    """The demo's scenario (``terradapt demo``): which data, how much of it, where files go.

    The loop itself (monitor, trigger, adaptation, gate, buffers...) is configured by the other sections, as in
    every runner.
    """

    dataset: Literal["synthetic", "dubai"] = "synthetic"
    workdir: Path = Path(".terradapt/demo")
    cache_dir: Path = Path(".terradapt/cache")
    report_dir: Path = Path("report")
    tile_size: int = Field(default=256, ge=64)
    train_tiles: int = Field(default=32, ge=4, description="source tiles per source region")
    calibration_tiles: int = Field(default=40, ge=8)
    stream_tiles: int = Field(default=40, ge=8, description="streamed tiles per region")
    eval_tiles: int = Field(default=12, ge=1, description="held-out labelled tiles per region")
    label_delay: int = Field(default=3, ge=0, description="acquisitions between a tile and its delayed label")
    train_steps: int = Field(default=300, ge=1)
    base_channels: int = Field(default=16, ge=4)
    arch: str = Field(
        default="small",
        description="source architecture: small, flair-baseline, or smp:<Arch>:<encoder> (terradapt.architectures)",
    )
    seed: int = 0

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from terradapt.architectures import check_arch_spec

        return check_arch_spec(v)  # an ArchitectureError is a ValueError: pydantic reports it


#: ``terradapt demo --quick``: a configuration for tests and smoke runs.
QUICK_DEMO: dict[str, Any] = {
    "train_tiles": 12,
    "calibration_tiles": 24,
    "stream_tiles": 24,
    "eval_tiles": 4,
    "train_steps": 120,
    "tile_size": 128,
}


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
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    crops: CropLoopConfig = Field(default_factory=CropLoopConfig)

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
    """Reject ``TERRADAPT_<SECTION>__<FIELD>[__<FIELD>...]`` variables that name no setting, listing the valid ones."""
    for key in environ:
        if not key.startswith(ENV_PREFIX) or ENV_DELIMITER not in key:
            continue
        model: type[BaseModel] = Settings
        where = "sections"
        for part in key[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER):
            fields = model.model_fields
            if part not in fields:
                raise ConfigError(f"unknown setting {key}: {where} are {', '.join(sorted(fields))}")
            annotation = _model_of(fields[part].annotation)
            if annotation is None:
                break  # a leaf (or a dict/JSON value): pydantic validates the rest
            model, where = annotation, f"fields of [{part}]"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``X`` or ``X | None``), else None."""
    candidates = [annotation, *get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


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
