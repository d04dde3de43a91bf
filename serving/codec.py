"""What travels between the TorchServe handler and its clients.

The handler's settings, the prediction JSON and the mapping of typed errors to HTTP answers.

It lives apart from ``serving.handler`` (which needs TorchServe's ``ts`` package) and ``serving.torchserve``
(which needs httpx), so each side imports only the format, and a change of the format is one diff in one file.

The response of one tile::

    {"model": "landcover-D033", "version": 3, "region": "D033", "sha256": "...",
     "class_map": {"encoding": "zlib+base64", "dtype": "uint8", "shape": [H, W], "data": "..."},
     "features": {"band_mean": [...], ..., "mean_confidence": 0.91},
     "crs": "EPSG:2154" | null, "transform": [a, b, c, d, e, f], "latency_ms": 12.3}

An error (HTTP 4xx/5xx)::

    {"error": {"reason": "invalid_tile", "message": "invalid tile: band_count=3; accepted: 5 bands ...",
               "status": 422}}
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import fields
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from monitoring.features import TileFeatures
from serving.predictor import TileOutput
from terradapt.errors import (
    InvalidPayloadError,
    InvalidTileError,
    ObjectNotFoundError,
    OversizedTileError,
    TerradaptError,
)
from terradapt.raster import RasterSpec
from terradapt.settings import StrictModel

CLASS_MAP_ENCODING = "zlib+base64"

#: Scalar (float) fields of TileFeatures; every other field is a 1-D array.
_SCALAR_FEATURES = frozenset({"bn_mean_shift", "bn_var_ratio", "mean_entropy", "mean_confidence"})


class StorageError(TerradaptError):
    """The object store behind an ``{"uri": ...}`` request is not configured or not reachable (retryable)."""

    reason = "storage_unavailable"


class HandlerConfig(StrictModel):
    """Settings of the TorchServe handler.

    Packaging writes them into the archive's ``model-config.yaml`` (section ``handler``), so that they travel
    with the model version they were validated with.
    """

    window: int = Field(default=512, ge=32, description="tiling window for rasters larger than it (px)")
    overlap: int = Field(default=32, ge=0)
    batch_size: int = Field(default=4, ge=1, description="windows or same-shaped tiles per forward pass")
    max_request_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1, description="raw GeoTIFF body limit; keep <= TorchServe max_request_size"
    )
    max_object_bytes: int = Field(default=256 * 1024 * 1024, ge=1, description="limit of objects read by URI")
    max_pixels: int = Field(
        default=4096 * 4096, ge=1, description="height x width bound: the stitched logits are K x H x W float32"
    )
    require_crs: bool = Field(
        default=False,
        description="the class map is returned in pixel space; callers that need georeferencing keep their own",
    )
    min_size: int = Field(default=32, ge=1)
    max_nodata_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    workers: int = Field(default=1, ge=1, description="TorchServe minWorkers = maxWorkers")
    response_timeout_s: int = Field(default=120, ge=1)

    def spec(self, band_count: int, *, from_uri: bool) -> RasterSpec:
        """The raster contract of one request (uploads and object reads have different byte limits)."""
        return RasterSpec(
            band_count=band_count,
            dtype="uint8",
            require_crs=self.require_crs,
            max_pixels=self.max_pixels,
            max_bytes=self.max_object_bytes if from_uri else self.max_request_bytes,
            min_size=self.min_size,
            max_nodata_fraction=self.max_nodata_fraction,
        )

    def model_config_yaml(self) -> dict[str, Any]:
        """The archive's ``model-config.yaml`` content (TorchServe keys plus our ``handler`` section)."""
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "responseTimeout": self.response_timeout_s,
            "handler": self.model_dump(),
        }


# -- class maps and features ------------------------------------------------------------------------------------
def encode_class_map(class_map: npt.NDArray[np.uint8]) -> dict[str, Any]:
    """Compact JSON form of a (H, W) uint8 class map: land cover compresses ~10-50x with zlib."""
    if class_map.ndim != 2:
        raise ValueError(f"class_map must be (height, width), got shape {class_map.shape}")
    raw = np.ascontiguousarray(class_map, dtype=np.uint8).tobytes()
    return {
        "encoding": CLASS_MAP_ENCODING,
        "dtype": "uint8",
        "shape": [int(class_map.shape[0]), int(class_map.shape[1])],
        "data": base64.b64encode(zlib.compress(raw, 6)).decode("ascii"),
    }


def decode_class_map(payload: dict[str, Any]) -> npt.NDArray[np.uint8]:
    """Inverse of `encode_class_map`; raises InvalidPayloadError naming what is wrong."""
    try:
        encoding, dtype = payload["encoding"], payload["dtype"]
        height, width = (int(v) for v in payload["shape"])
        raw = zlib.decompress(base64.b64decode(payload["data"], validate=True))
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise InvalidPayloadError(f"class_map is not a {CLASS_MAP_ENCODING} uint8 map: {exc!r}") from exc
    if encoding != CLASS_MAP_ENCODING or dtype != "uint8":
        raise InvalidPayloadError(
            f"class_map encoding={encoding!r} dtype={dtype!r}; accepted: {CLASS_MAP_ENCODING!r} uint8"
        )
    if len(raw) != height * width:
        raise InvalidPayloadError(f"class_map has {len(raw)} bytes; shape {height}x{width} needs {height * width}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width).copy()


def features_to_json(features: TileFeatures) -> dict[str, Any]:
    """Every TileFeatures field: arrays as lists of floats (exact: JSON floats round-trip float64)."""
    out: dict[str, Any] = {}
    for f in fields(TileFeatures):
        value = getattr(features, f.name)
        out[f.name] = float(value) if f.name in _SCALAR_FEATURES else [float(v) for v in np.ravel(value)]
    return out


def features_from_json(payload: dict[str, Any]) -> TileFeatures:
    """Inverse of `features_to_json`; raises InvalidPayloadError on a missing, extra or non-numeric field."""
    names = {f.name for f in fields(TileFeatures)}
    if set(payload) != names:
        missing, extra = sorted(names - set(payload)), sorted(set(payload) - names)
        raise InvalidPayloadError(f"features fields differ from TileFeatures: missing {missing}, unexpected {extra}")
    values: dict[str, Any] = {}
    try:
        for name in names:
            if name in _SCALAR_FEATURES:
                values[name] = float(payload[name])
            else:
                values[name] = np.asarray(payload[name], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidPayloadError(f"features are not numeric: {exc}") from exc
    return TileFeatures(**values)


def encode_prediction(
    output: TileOutput,
    *,
    model: str,
    region: str,
    sha256: str,
    crs: str | None,
    transform: tuple[float, ...],
    latency_ms: float,
) -> dict[str, Any]:
    """The handler's JSON answer for one tile."""
    return {
        "model": model,
        "version": int(output.version),
        "region": region,
        "sha256": sha256,
        "class_map": encode_class_map(output.class_map),
        "features": features_to_json(output.features),
        "crs": crs,
        "transform": [float(v) for v in transform],
        "latency_ms": round(latency_ms, 3),
    }


def decode_prediction(payload: dict[str, Any]) -> TileOutput:
    """Turn the handler's JSON answer back into the TileOutput an in-process predictor would have returned."""
    try:
        version = int(payload["version"])
        class_map = decode_class_map(payload["class_map"])
        features = features_from_json(payload["features"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InvalidPayloadError):
            raise
        raise InvalidPayloadError(f"not a terradapt prediction: {exc!r}") from exc
    return TileOutput(class_map=class_map, features=features, version=version)


# -- errors -----------------------------------------------------------------------------------------------------
def error_status(exc: BaseException) -> int:
    """HTTP status of an error: 4xx when the request is at fault (do not retry), 5xx when the server is."""
    if isinstance(exc, OversizedTileError):
        return 413
    if isinstance(exc, InvalidTileError):  # includes CorruptTileError: well-formed request, unusable raster
        return 422
    if isinstance(exc, InvalidPayloadError):
        return 400
    if isinstance(exc, ObjectNotFoundError):
        return 404
    if isinstance(exc, StorageError):
        return 503
    return 500


def error_body(exc: BaseException) -> dict[str, Any]:
    """JSON body of an error answer; the message of a typed error names the field, value and what is accepted."""
    reason = exc.reason if isinstance(exc, TerradaptError) else "internal_error"
    message = str(exc) if isinstance(exc, TerradaptError) else f"{type(exc).__name__}: prediction failed"
    return {"error": {"reason": reason, "message": message, "status": error_status(exc)}}
