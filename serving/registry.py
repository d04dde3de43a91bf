"""Model registry over a blob store: versions per region, aliases, lineage, sha256-verified loads.

Layout (same on the file system and in MinIO)::

    models/source/0/{weights.safetensors, manifest.json}     the shared source model (never deleted)
    models/source/0/calibration.json                         its calibration data (monitoring.calibration)
    models/<region>/<version>/{weights.safetensors, manifest.json}
    aliases/<region>.json                                    {"current": v, "previous": v or null}

Every region's lineage starts at version 0 = the source model. Weights are written before the manifest, and a
version exists only once its manifest does, so a reader never sees a half-written version. ``publish`` is
idempotent per adaptation job id: a retried job returns the version it already made.
"""

from __future__ import annotations

import json

from monitoring.calibration import CalibrationData
from serving.store import BlobStore
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest, decode, sha256_hex
from terradapt.errors import ChecksumMismatchError, ModelVersionNotFoundError, ObjectNotFoundError
from terradapt.model import SegmentationModel
from terradapt.records import ModelVersion

SOURCE = "source"
CALIBRATION_KEY = f"models/{SOURCE}/0/calibration.json"


class ModelRegistry:
    """Versions, aliases and history of every region's model."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    @staticmethod
    def _prefix(region: str, version: int) -> str:
        return f"models/{SOURCE}/0" if version == 0 else f"models/{region}/{version}"

    def publish_source(self, weights: bytes, manifest: ModelManifest) -> ModelVersion:
        """Store the shared source model as version 0 of every lineage."""
        stamped = manifest.model_copy(update={"region": SOURCE, "version": 0, "parent": None})
        return self._write(SOURCE, 0, weights, stamped)

    def publish(self, weights: bytes, manifest: ModelManifest) -> ModelVersion:
        """Store a new version of ``manifest.region``; return the existing one if the job already published."""
        region = manifest.region
        existing = self.history(region)
        if manifest.job_id is not None:
            for m in existing:
                if m.job_id == manifest.job_id:
                    return self.record(m)
        version = max((m.version for m in existing), default=0) + 1
        return self._write(region, version, weights, manifest.model_copy(update={"version": version}))

    def _write(self, region: str, version: int, weights: bytes, manifest: ModelManifest) -> ModelVersion:
        sha = sha256_hex(weights)
        if manifest.sha256 and manifest.sha256 != sha:
            raise ChecksumMismatchError(f"{region} v{version}", manifest.sha256, sha)
        manifest = manifest.model_copy(update={"sha256": sha})
        prefix = self._prefix(region, version)
        self.store.put(f"{prefix}/{WEIGHTS_FILE}", weights)
        self.store.put(f"{prefix}/{MANIFEST_FILE}", manifest.model_dump_json(indent=2).encode(), "application/json")
        return self.record(manifest)

    # -- calibration -------------------------------------------------------------------------------------------
    def publish_calibration(self, data: CalibrationData) -> str:
        """Store the source model's calibration data beside it; return its URI.

        Raises:
            ValueError: The data was computed with other weights than the stored source model's, or on tiles the
                source model trained on (its manifest lists them): a calibration must be held out.

        """
        manifest = self.manifest(SOURCE, 0)
        if data.model_sha256 and data.model_sha256 != manifest.sha256:
            raise ValueError(
                f"calibration computed with weights {data.model_sha256[:12]}..., the source model is "
                f"{manifest.sha256[:12]}...: calibrate with the published source model"
            )
        overlap = sorted(set(data.tile_ids) & set(manifest.training_tiles))
        if overlap:
            shown = ", ".join(overlap[:5]) + (" ..." if len(overlap) > 5 else "")
            raise ValueError(
                f"{len(overlap)} calibration tile(s) were used to train the source model ({shown}): "
                "calibrate on held-out source tiles"
            )
        return self.store.put(CALIBRATION_KEY, data.model_dump_json().encode(), "application/json")

    def calibration(self) -> CalibrationData:
        """The source model's calibration data.

        Raises:
            ObjectNotFoundError: No calibration was published (``terradapt registry-init`` does it).

        """
        if not self.store.exists(CALIBRATION_KEY):
            raise ObjectNotFoundError(self.store.uri(CALIBRATION_KEY))
        return CalibrationData.model_validate_json(self.store.get(CALIBRATION_KEY))

    def find_job(self, region: str, job_id: str) -> ModelVersion | None:
        """The version an adaptation job already published, if any (retried jobs must not publish twice)."""
        for m in self.history(region):
            if m.job_id == job_id:
                return self.record(m)
        return None

    def record(self, m: ModelManifest) -> ModelVersion:
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

    def manifest(self, region: str, version: int) -> ModelManifest:
        """The manifest of one version."""
        key = f"{self._prefix(region, version)}/{MANIFEST_FILE}"
        if not self.store.exists(key):
            raise ModelVersionNotFoundError(region, version)
        return ModelManifest.model_validate_json(self.store.get(key))

    def load(self, region: str, version: int | None = None) -> tuple[SegmentationModel, ModelManifest]:
        """Load (and sha256-verify) a version; ``None`` means the region's current version."""
        v = self.current(region) if version is None else version
        prefix = self._prefix(region, v)
        manifest_json = self.manifest(region, v).model_dump_json().encode()
        return decode(self.store.get(f"{prefix}/{WEIGHTS_FILE}"), manifest_json, what=f"{region} v{v}")

    def weights(self, region: str, version: int) -> bytes:
        """Raw verified weights bytes of a version (for packaging)."""
        manifest = self.manifest(region, version)
        data = self.store.get(f"{self._prefix(region, version)}/{WEIGHTS_FILE}")
        if sha256_hex(data) != manifest.sha256:
            raise ChecksumMismatchError(f"{region} v{version}", manifest.sha256, sha256_hex(data))
        return data

    def _aliases(self, region: str) -> dict[str, int | None]:
        key = f"aliases/{region}.json"
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
        """Point the region's alias at ``version`` (one atomic object write), keeping the old one as previous."""
        self.manifest(region, version)  # raises if missing
        old = self.current(region)
        if old == version:
            return
        payload = json.dumps({"current": version, "previous": old}).encode()
        self.store.put(f"aliases/{region}.json", payload, "application/json")

    def history(self, region: str) -> list[ModelManifest]:
        """Every complete version of the region's lineage (source excluded), oldest first."""
        out = []
        for key in self.store.list(f"models/{region}/"):
            if key.endswith(f"/{MANIFEST_FILE}"):
                out.append(ModelManifest.model_validate_json(self.store.get(key)))
        return sorted(out, key=lambda m: m.version)

    def delete(self, region: str, version: int) -> None:
        """Remove a version; the source, current and previous versions are refused."""
        protected = {0, self.current(region), self.previous(region)}
        if version in protected:
            raise ValueError(f"refusing to delete {region} v{version}: source, current or previous")
        prefix = self._prefix(region, version)
        self.store.delete(f"{prefix}/{MANIFEST_FILE}")
        self.store.delete(f"{prefix}/{WEIGHTS_FILE}")
