"""Registry of crop model versions over the same blob store as the segmentation registry (file system or MinIO).

Layout (under its own prefix, so one bucket can hold both tasks)::

    crops/models/source/0/{weights.safetensors, manifest.json}     the shared source crop model
    crops/models/<region>/<version>/{weights.safetensors, manifest.json}
    crops/aliases/<region>.json                                    {"current": v, "previous": v or null}
    crops/calibration.npz, crops/calibration.json                  the drift monitor's calibration vectors

Why not :class:`serving.registry.ModelRegistry` itself: its manifest is the segmentation ``ModelManifest`` (image
bands, per-class radiometry, tiles the model trained on) and its loads build a ``SegmentationModel``; a crop
version is a ``CropManifest`` (classes, bands, day-of-year offset, parcels' regions) and builds a ``CropModel``.
The rules are the same, so both are a :class:`serving.lineage.VersionRegistry` of their manifest: every lineage starts
at version 0 = the source model; the weights are written before the manifest and a version exists once its
manifest does; the manifest holds the weights' sha256, checked on every load; ``publish`` is idempotent per
adaptation job id; the alias write is one object put.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from monitoring.calibration import CalibrationError
from serving.lineage import VersionRegistry
from serving.store import BlobStore
from terradapt.checkpoint import sha256_hex
from terradapt.crops.checkpoint import CropManifest, decode_crop
from terradapt.crops.model import CropModel

__all__ = ["CropRegistry"]

ROOT = "crops"
CALIBRATION_NPZ = f"{ROOT}/calibration.npz"
CALIBRATION_JSON = f"{ROOT}/calibration.json"


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

    # -- the drift monitor's calibration --------------------------------------------------------------------
    def put_calibration(self, vectors: Mapping[str, npt.NDArray[np.float64]]) -> None:
        """Store the drift vectors of held-out source parcels under the source model (signal -> (N, d)).

        Every worker calibrates its monitors from them (cut in two halves, in the stored order), so the vectors
        are stored already shuffled; the sidecar names the source weights they were computed with.
        """
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {name: np.asarray(v, np.float64) for name, v in vectors.items()}
        np.savez_compressed(buffer, allow_pickle=False, **arrays)
        data = buffer.getvalue()
        self.store.put(CALIBRATION_NPZ, data)
        meta = {
            "model_sha256": self.manifest("source", 0).sha256,
            "npz_sha256": sha256_hex(data),
            "parcels": int(min(len(v) for v in vectors.values())),
            "signals": sorted(vectors),
        }
        self.store.put(CALIBRATION_JSON, json.dumps(meta, indent=1).encode(), "application/json")

    def calibration(self) -> dict[str, npt.NDArray[np.float64]]:
        """The stored calibration vectors (read without pickle, checked against their sha256 and the source model).

        Raises:
            CalibrationError: none stored, corrupt, or computed with other weights than the registry's source.

        """
        if not self.store.exists(CALIBRATION_JSON):
            raise CalibrationError("no crop calibration in the registry: run `terradapt crops init`")
        meta = json.loads(self.store.get(CALIBRATION_JSON))
        data = self.store.get(CALIBRATION_NPZ)
        if sha256_hex(data) != meta.get("npz_sha256"):
            raise CalibrationError(f"{CALIBRATION_NPZ} does not match its sha256 in {CALIBRATION_JSON}")
        source = self.manifest("source", 0).sha256
        if meta.get("model_sha256") != source:
            raise CalibrationError(
                f"crop calibration was computed with source weights {str(meta.get('model_sha256'))[:12]}..., the "
                f"registry's source model is {source[:12]}...: run `terradapt crops init` again"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {name: np.asarray(npz[name], np.float64) for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CalibrationError(f"{CALIBRATION_NPZ} is not a calibration npz: {exc}") from exc
