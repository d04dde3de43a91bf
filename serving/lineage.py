"""Per-region model lineages over a blob store: versions, aliases, idempotent publish. Shared by every registry.

Layout under a root (``""`` for segmentation, ``"crops/"`` for crop models, so one bucket can hold both)::

    <root>models/source/0/{weights.safetensors, manifest.json}     the shared source model
    <root>models/<region>/<version>/{weights.safetensors, manifest.json}
    <root>aliases/<region>.json                                    {"current": v, "previous": v or null}

The rules do not depend on the task, only the manifest type and the model a load builds do, so each task's
registry is a :class:`VersionRegistry` of its manifest that adds its ``load`` (and any file beside a version).
The rules: every lineage starts at version 0 = the source model; the weights are written before the manifest and
a version exists once its manifest does, so a reader never sees a half-written version; the manifest holds the
weights' sha256; ``publish`` is idempotent per adaptation job id; the alias write is one object put.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from serving.store import BlobStore
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, sha256_hex
from terradapt.errors import ChecksumMismatchError, ModelVersionNotFoundError
from terradapt.records import ModelVersion

__all__ = ["SOURCE", "VersionManifest", "VersionRegistry"]

SOURCE = "source"


class VersionManifest(Protocol):
    """The fields of a manifest (of any task) that a lineage reads and stamps."""

    @property
    def region(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def parent(self) -> int | None: ...
    @property
    def method(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def job_id(self) -> str | None: ...
    @property
    def gate_accepted(self) -> bool: ...
    @property
    def gate_reasons(self) -> tuple[str, ...]: ...
    @property
    def gate_metrics(self) -> dict[str, float]: ...

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self: ...

    def model_dump_json(self, *, indent: int | None = None) -> str: ...


M = TypeVar("M", bound=VersionManifest)


class VersionRegistry(Generic[M]):
    """Versions, aliases and history of every region's model of one task; subclasses add ``load``.

    Args:
        store: Where versions and aliases live.
        parse: Manifest JSON bytes -> the task's manifest (e.g. ``ModelManifest.model_validate_json``).

    """

    #: key prefix of the task's versions and aliases (``""`` or ``"crops/"``)
    _root: ClassVar[str] = ""
    #: prefix of the ``"<region> v<version>"`` names in errors (``"crops "`` for crop models)
    _label: ClassVar[str] = ""

    def __init__(self, store: BlobStore, parse: Callable[[bytes], M]) -> None:
        self.store = store
        self._parse = parse

    def _what(self, region: str, version: int) -> str:
        return f"{self._label}{region} v{version}"

    def _prefix(self, region: str, version: int) -> str:
        return f"{self._root}models/{SOURCE}/0" if version == 0 else f"{self._root}models/{region}/{version}"

    def publish_source(self, weights: bytes, manifest: M) -> ModelVersion:
        """Store the shared source model as version 0 of every lineage."""
        stamped = manifest.model_copy(update={"region": SOURCE, "version": 0, "parent": None})
        return self._write(SOURCE, 0, weights, stamped)

    def publish(self, weights: bytes, manifest: M) -> ModelVersion:
        """Store a new version of ``manifest.region``; return the existing one if its job already published."""
        existing = self.history(manifest.region)
        if manifest.job_id is not None:
            for m in existing:
                if m.job_id == manifest.job_id:
                    return self.record(m)
        version = max((m.version for m in existing), default=0) + 1
        return self._write(manifest.region, version, weights, manifest.model_copy(update={"version": version}))

    def _write(self, region: str, version: int, weights: bytes, manifest: M) -> ModelVersion:
        sha = sha256_hex(weights)
        if manifest.sha256 and manifest.sha256 != sha:
            raise ChecksumMismatchError(self._what(region, version), manifest.sha256, sha)
        manifest = manifest.model_copy(update={"sha256": sha})
        prefix = self._prefix(region, version)
        self.store.put(f"{prefix}/{WEIGHTS_FILE}", weights)
        self.store.put(f"{prefix}/{MANIFEST_FILE}", manifest.model_dump_json(indent=2).encode(), "application/json")
        self._after_write(prefix, manifest)
        return self.record(manifest)

    def _after_write(self, prefix: str, manifest: M) -> None:
        """Write what a task keeps beside a version's manifest (nothing by default)."""

    def find_job(self, region: str, job_id: str) -> ModelVersion | None:
        """The version an adaptation job already published, if any (retried jobs must not publish twice)."""
        for m in self.history(region):
            if m.job_id == job_id:
                return self.record(m)
        return None

    def record(self, m: M) -> ModelVersion:
        """The ModelVersion record of a stored manifest."""
        return ModelVersion(
            region=m.region,
            version=m.version,
            parent=m.parent,
            method=m.method,
            sha256=m.sha256,
            href=self.store.uri(self._prefix(m.region, m.version)),
            accepted=m.gate_accepted,
            gate_reasons=m.gate_reasons,
            gate_metrics=m.gate_metrics,
            job_id=m.job_id,
        )

    def manifest(self, region: str, version: int) -> M:
        """The manifest of one version.

        Raises:
            ModelVersionNotFoundError: no such version.

        """
        key = f"{self._prefix(region, version)}/{MANIFEST_FILE}"
        if not self.store.exists(key):
            raise ModelVersionNotFoundError(region, version)
        return self._parse(self.store.get(key))

    def _stored_weights(self, region: str, version: int) -> bytes:
        """The weights bytes of a version as stored (not verified: the caller checks them against the manifest)."""
        return self.store.get(f"{self._prefix(region, version)}/{WEIGHTS_FILE}")

    def _aliases(self, region: str) -> dict[str, int | None]:
        key = f"{self._root}aliases/{region}.json"
        if not self.store.exists(key):
            return {"current": 0, "previous": None}
        data: dict[str, int | None] = json.loads(self.store.get(key))
        return data

    def current(self, region: str) -> int:
        """The version a region serves (0 = source until an adaptation is promoted)."""
        v = self._aliases(region)["current"]
        return 0 if v is None else v

    def previous(self, region: str) -> int | None:
        """The version served before the current one (the rollback target)."""
        return self._aliases(region)["previous"]

    def set_current(self, region: str, version: int) -> None:
        """Point the region's alias at ``version`` (one atomic object write), keeping the old one as previous.

        Raises:
            ModelVersionNotFoundError: no such version.

        """
        self.manifest(region, version)  # raises if missing
        old = self.current(region)
        if old == version:
            return
        payload = json.dumps({"current": version, "previous": old}).encode()
        self.store.put(f"{self._root}aliases/{region}.json", payload, "application/json")

    def history(self, region: str) -> list[M]:
        """Every complete version of the region's lineage (source excluded), oldest first."""
        keys = [k for k in self.store.list(f"{self._root}models/{region}/") if k.endswith(f"/{MANIFEST_FILE}")]
        return sorted((self._parse(self.store.get(k)) for k in keys), key=lambda m: m.version)
