"""Model registry over a blob store: versions per region, aliases, lineage, sha256-verified loads.

Layout (same on the file system and in MinIO)::

    models/source/0/{weights.safetensors, manifest.json}     the shared source model (never deleted)
    models/source/0/calibration.json                         its calibration data (monitoring.calibration)
    models/<region>/<version>/{weights.safetensors, manifest.json, item.json}
    aliases/<region>.json                                    {"current": v, "previous": v or null}

Every region's lineage starts at version 0 = the source model. Weights are written before the manifest, and a
version exists only once its manifest does, so a reader never sees a half-written version (the rules every task's
registry shares live in :class:`serving.lineage.VersionRegistry`). ``item.json`` describes
the version as a STAC item with the Machine Learning Model extension (``terradapt.stac_items.model_item``), for
catalogs and STAC tools; the manifest stays what loads trust. ``publish`` is
idempotent per adaptation job id: a retried job returns the version it already made.
"""

from __future__ import annotations

import json

from monitoring.calibration import CalibrationData
from serving.lineage import SOURCE, VersionRegistry
from serving.store import BlobStore
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest, decode, verify_sha256
from terradapt.errors import ObjectNotFoundError
from terradapt.model import SegmentationModel
from terradapt.stac_items import model_item

#: the STAC MLM item of a version, beside its manifest
STAC_ITEM_FILE = "item.json"

__all__ = ["CALIBRATION_KEY", "SOURCE", "STAC_ITEM_FILE", "ModelRegistry"]

CALIBRATION_KEY = f"models/{SOURCE}/0/calibration.json"


class ModelRegistry(VersionRegistry[ModelManifest]):
    """Versions, aliases and history of every region's model."""

    def __init__(self, store: BlobStore) -> None:
        super().__init__(store, ModelManifest.model_validate_json)

    def _after_write(self, prefix: str, manifest: ModelManifest) -> None:
        item = json.dumps(self.stac_item(manifest), indent=1).encode()
        self.store.put(f"{prefix}/{STAC_ITEM_FILE}", item, "application/geo+json")

    def stac_item_uri(self, region: str, version: int) -> str:
        """Where the STAC MLM item of a version is (``item.json`` beside its manifest)."""
        return self.store.uri(f"{self._prefix(region, version)}/{STAC_ITEM_FILE}")

    def stac_item(self, manifest: ModelManifest) -> dict[str, object]:
        """The STAC MLM item (as JSON) describing a stored version's manifest, weights and lineage."""
        prefix = self._prefix(manifest.region, manifest.version)
        parent = None if manifest.parent is None else self.stac_item_uri(manifest.region, manifest.parent)
        item = model_item(
            manifest,
            weights_href=self.store.uri(f"{prefix}/{WEIGHTS_FILE}"),
            manifest_href=self.store.uri(f"{prefix}/{MANIFEST_FILE}"),
            parent_href=parent,
        )
        return item.to_dict(include_self_link=False, transform_hrefs=False)

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

    def load(self, region: str, version: int | None = None) -> tuple[SegmentationModel, ModelManifest]:
        """Load (and sha256-verify) a version; ``None`` means the region's current version."""
        v = self.current(region) if version is None else version
        manifest_json = self.manifest(region, v).model_dump_json().encode()
        return decode(self._stored_weights(region, v), manifest_json, what=self._what(region, v))

    def weights(self, region: str, version: int) -> bytes:
        """Raw verified weights bytes of a version (for packaging)."""
        manifest = self.manifest(region, version)
        data = self._stored_weights(region, version)
        verify_sha256(data, manifest.sha256, self._what(region, version))
        return data

    def delete(self, region: str, version: int) -> None:
        """Remove a version; the source, current and previous versions are refused."""
        protected = {0, self.current(region), self.previous(region)}
        if version in protected:
            raise ValueError(f"refusing to delete {region} v{version}: source, current or previous")
        prefix = self._prefix(region, version)
        self.store.delete(f"{prefix}/{MANIFEST_FILE}")
        self.store.delete(f"{prefix}/{STAC_ITEM_FILE}")
        self.store.delete(f"{prefix}/{WEIGHTS_FILE}")
