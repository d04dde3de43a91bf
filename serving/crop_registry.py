"""Registry of crop model versions over the same blob store as the segmentation registry (file system or MinIO).

Layout (under its own prefix, so one bucket can hold both tasks)::

    crops/models/source/0/{weights.safetensors, manifest.json}     the shared source crop model
    crops/models/<region>/<version>/{weights.safetensors, manifest.json}
    crops/aliases/<region>.json                                    {"current": v, "previous": v or null}

Why not :class:`serving.registry.ModelRegistry` itself: its manifest is the segmentation ``ModelManifest`` (image
bands, per-class radiometry, tiles the model trained on) and its loads build a ``SegmentationModel``; a crop
version is a ``CropManifest`` (classes, bands, day-of-year offset, parcels' regions) and builds a ``CropModel``.
The rules are the same, so both are a :class:`serving.lineage.VersionRegistry` of their manifest: every lineage starts
at version 0 = the source model; the weights are written before the manifest and a version exists once its
manifest does; the manifest holds the weights' sha256, checked on every load; ``publish`` is idempotent per
adaptation job id; the alias write is one object put.
"""

from __future__ import annotations

from serving.lineage import VersionRegistry
from serving.store import BlobStore
from terradapt.crops.checkpoint import CropManifest, decode_crop
from terradapt.crops.model import CropModel

__all__ = ["CropRegistry"]

ROOT = "crops"


class CropRegistry(VersionRegistry[CropManifest]):
    """Versions, aliases and history of every region's crop model."""

    _root = f"{ROOT}/"
    _label = f"{ROOT} "

    def __init__(self, store: BlobStore) -> None:
        super().__init__(store, CropManifest.model_validate_json)

    def load(self, region: str, version: int | None = None) -> tuple[CropModel, CropManifest]:
        """Load and sha256-verify a version (``None``: the region's current one); eval mode.

        Raises:
            ModelVersionNotFoundError: no such version.
            ChecksumMismatchError: the stored weights do not match the manifest's sha256.

        """
        v = self.current(region) if version is None else version
        manifest_json = self.manifest(region, v).model_dump_json().encode()
        return decode_crop(self._stored_weights(region, v), manifest_json, what=self._what(region, v))
