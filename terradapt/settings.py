"""Typed configuration building blocks.

Every config model forbids unknown keys, so a typo in a file or an environment variable fails loudly with the
field name instead of being ignored. Layers define their own small configs (a detector's, an adapter's); the
runner composes them (see ``stream.config``). Connection settings of the external services live here because
several layers use them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class StrictModel(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(StrictModel):
    """Apache Kafka connection and topic layout."""

    bootstrap: str = "127.0.0.1:19092"
    topic_prefix: str = "terradapt."
    partitions: int = Field(default=4, ge=1)
    session_timeout_s: float = Field(default=10.0, ge=6.0, description="a dead worker's partitions move after this")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    username: str | None = Field(default=None, description="SASL user")
    password: SecretStr | None = Field(default=None, description="SASL password (environment only, never a file)")
    password_file: Path | None = Field(default=None, description="file holding the SASL password (a mounted secret)")
    ca_file: Path | None = Field(default=None, description="PEM CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(default=None, description="PEM client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="PEM private key of the client certificate")
    check_hostname: bool = Field(default=True, description="verify the broker's certificate names its host")

    @model_validator(mode="after")
    def _complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and (
            self.username is None or (self.password is None and self.password_file is None)
        ):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs username and password (TERRADAPT_KAFKA__USERNAME, "
                "TERRADAPT_KAFKA__PASSWORD or TERRADAPT_KAFKA__PASSWORD_FILE)"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        return self

    @property
    def uses_tls(self) -> bool:
        """Whether connections are encrypted (SSL or SASL_SSL)."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    def sasl_password(self) -> str | None:
        """The SASL password: from ``password``, else read from ``password_file`` (trailing newline dropped)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().rstrip("\r\n")
        return None


class S3Config(StrictModel):
    """MinIO / S3 connection (credentials only from the environment or a secret file, never from code)."""

    endpoint: str = "127.0.0.1:19000"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    secure: bool = False
    ca_file: Path | None = Field(default=None, description="PEM CA bundle that signed the endpoint's certificate (TLS)")
    bucket_acquisitions: str = "terradapt-acquisitions"
    bucket_predictions: str = "terradapt-predictions"
    bucket_models: str = "terradapt-models"


class RolloutConfig(StrictModel):
    """How the TorchServe deployer checks and keeps versions (the gate thresholds are ``adaptation.gate``)."""

    shadow_tiles: int = Field(default=16, ge=1, description="most recent job tiles compared in the shadow step")
    min_shadow_tiles: int = Field(
        default=1, ge=1, description="fewer job tiles than this: the candidate is refused (fail closed)"
    )
    post_check_tiles: int = Field(
        default=2, ge=0, description="tiles re-predicted on the default URL after set-default"
    )
    keep_versions: int = Field(
        default=3, ge=2, description="versions kept registered per region; source, current, previous always kept"
    )
    prune_registry: bool = Field(default=False, description="also delete pruned versions' weights from the registry")
    register_timeout_s: float = Field(default=180.0, gt=0)
    initial_workers: int = Field(default=1, ge=1)


class TorchServeConfig(StrictModel):
    """TorchServe addresses, auth and rollout policy."""

    inference_url: str = "http://127.0.0.1:18080"
    management_url: str = "http://127.0.0.1:18081"
    metrics_url: str = "http://127.0.0.1:18082"
    key_file: Path | None = None
    model_store: Path | None = Field(default=None, description="TorchServe's model store (archives written there)")
    timeout_s: float = 30.0
    retries: int = Field(default=3, ge=0)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)


class RuntimeConfig(StrictModel):
    """Where terradapt keeps its files and which device it computes on."""

    workdir: Path = Path(".terradapt")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    predictor: Literal["inprocess", "torchserve"] = "inprocess"
    window: int = Field(default=512, ge=32, description="tiling window for large acquisitions (px)")
    overlap: int = Field(default=32, ge=0)
    batch_size: int = Field(default=4, ge=1)
    seed: int = 0
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch intra-op threads of a process (0 = torch's default, one per core); one stream worker per "
        "core wants 1, so that workers do not fight over the cores",
    )


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file into a dict (one file per environment under deploy/config/)."""
    with path.open("rb") as fh:
        return tomllib.load(fh)
