"""TorchServe handler: one terradapt model version behind ``/predictions/landcover-<REGION>/<version>``.

Thin on purpose (TorchServe's own ``image_segmenter`` is the model): it overrides only what differs from
``BaseHandler`` - loading (safetensors + manifest, sha256-verified by ``terradapt.checkpoint.decode``; never
``torch.load``, so an archive cannot execute code through a pickle), request decoding (raw GeoTIFF bytes or
``{"uri": "s3://bucket/key"}``), and the JSON answer. Prediction itself is ``serving.predictor.predict_images``,
the routine the in-process predictor runs, so both runners tile, blend and featurize identically.

A bad request must not crash the worker (TorchServe would restart it and fail the whole batch): each request is
validated on its own with ``read_raster`` and a typed error becomes that request's 4xx JSON answer (see
``serving.codec``) while the other requests of the batch are still predicted.

Where the project code comes from: ``serving.packaging`` copies the ``terradapt``, ``monitoring`` and ``serving``
packages into the archive, and TorchServe puts the unpacked archive first on the worker's ``sys.path``, so every
model version runs the exact code it was packaged and checked with, whatever the server's working tree holds.
Third-party libraries (torch, numpy, rasterio, safetensors, pydantic, minio) come from the interpreter TorchServe
was started with (``deploy/torchserve/torchserve.sh`` uses the project's venv).

This module defines exactly one class: TorchServe's loader instantiates the only class a handler file defines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

import terradapt
from serving.codec import HandlerConfig, StorageError, encode_prediction, error_body, error_status
from serving.hrefs import read_bounded
from serving.predictor import TileOutput, predict_images
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest, decode
from terradapt.errors import InvalidPayloadError, ObjectNotFoundError, OversizedTileError, TerradaptError
from terradapt.raster import Raster, read_raster

logger = logging.getLogger(__name__)

_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>[^\x00]+)$")

#: One request after preprocessing: the validated raster, or the error that rejected it.
Item = Raster | TerradaptError
#: One request after inference: (raster, output, seconds) or the error.
Result = tuple[Raster, TileOutput, float] | BaseException


def _env(name: str) -> str | None:
    """A storage setting: ``TERRADAPT_S3__<NAME>`` (nested settings style), else ``TERRADAPT_S3_<NAME>``."""
    return os.environ.get(f"TERRADAPT_S3__{name}") or os.environ.get(f"TERRADAPT_S3_{name}")


class TerradaptHandler(BaseHandler):  # type: ignore[misc]  # ts is untyped
    """Serve one terradapt model version: GeoTIFF or object URI in, class map + drift features out."""

    def __init__(self) -> None:
        super().__init__()
        self.config = HandlerConfig()
        self.served: ModelManifest | None = None
        self.model_name = ""
        self._storage: Any = None  # minio.Minio, made on the first URI request

    # -- load -----------------------------------------------------------------------------------------------------
    def initialize(self, context: Any) -> None:
        """Load and verify the weights of the archive; read the handler section of ``model-config.yaml``.

        Args:
            context: TorchServe's context (``system_properties["model_dir"]``, ``manifest``, ``model_yaml_config``).

        Raises:
            ChecksumMismatchError: The weights differ from the manifest's sha256 (the worker must not serve them).

        """
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest
        self.model_name = str((self.manifest or {}).get("model", {}).get("modelName", ""))
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = HandlerConfig.model_validate(yaml_config.get("handler", {}))
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        model, self.served = decode(
            (model_dir / WEIGHTS_FILE).read_bytes(),
            (model_dir / MANIFEST_FILE).read_bytes(),
            what=f"{self.model_name or model_dir.name} {WEIGHTS_FILE}",
        )
        self.model = model.to(self.device).eval()
        self.initialized = True
        logger.info(
            "loaded %s version %s (region %s, sha256 %s) on %s; project code from %s",
            self.model_name,
            self.served.version,
            self.served.region,
            self.served.sha256[:12],
            self.device,
            Path(terradapt.__file__).parent.parent,
        )

    # -- requests -------------------------------------------------------------------------------------------------
    def preprocess(self, data: list[dict[str, Any]]) -> list[Item]:
        """Decode and validate every request of the batch on its own (a bad one does not sink the others)."""
        items: list[Item] = []
        for row in data:
            try:
                items.append(self._read(row))
            except TerradaptError as exc:
                items.append(exc)
        return items

    def inference(self, data: list[Item], *args: Any, **kwargs: Any) -> list[Result]:
        """Predict the valid rasters in one call (same-shaped tiles share forward passes)."""
        if self.served is None:
            raise RuntimeError("handler used before initialize()")
        results: dict[int, Result] = {i: item for i, item in enumerate(data) if not isinstance(item, Raster)}
        rasters = {i: item for i, item in enumerate(data) if isinstance(item, Raster)}
        if rasters:
            t0 = time.perf_counter()
            try:
                outputs = predict_images(
                    self.model,
                    [r.data for r in rasters.values()],
                    self.served.version,
                    self.device,
                    self.config.window,
                    self.config.overlap,
                    self.config.batch_size,
                )
            except Exception as exc:  # reported per request as a 500; the worker keeps serving
                logger.exception("prediction failed for %d raster(s)", len(rasters))
                results.update(dict.fromkeys(rasters, exc))
            else:
                seconds = (time.perf_counter() - t0) / len(rasters)
                for (i, raster), output in zip(rasters.items(), outputs, strict=True):
                    results[i] = (raster, output, seconds)
        return [results[i] for i in range(len(data))]

    def postprocess(self, data: list[Result]) -> list[str]:
        """One JSON document per request; errors also set that request's HTTP status."""
        if self.served is None:
            raise RuntimeError("handler used before initialize()")
        answers: list[str] = []
        for idx, result in enumerate(data):
            if isinstance(result, BaseException):
                body = error_body(result)
                self._status(idx, error_status(result), body["error"]["reason"])
            else:
                raster, output, seconds = result
                body = encode_prediction(
                    output,
                    model=self.model_name,
                    region=self.served.region,
                    sha256=self.served.sha256,
                    crs=raster.crs,
                    transform=tuple(raster.transform)[:6],
                    latency_ms=seconds * 1000.0,
                )
                self._status(idx, 200, "OK")
            answers.append(json.dumps(body, separators=(",", ":")))
        return answers

    def describe_handle(self) -> dict[str, Any]:
        """What ``GET /models/<name>/<version>?customized=true`` shows: lineage, sha256 and handler settings."""
        if self.served is None:
            return {}
        lineage = self.served.model_dump(
            mode="json", include={"region", "version", "parent", "method", "sha256", "metrics", "created"}
        )
        return {"manifest": lineage, "handler": self.config.model_dump()}

    # -- helpers --------------------------------------------------------------------------------------------------
    def _status(self, idx: int, code: int, phrase: str) -> None:
        if self.context is not None:
            self.context.set_response_status(code, phrase, idx)
            self.context.set_response_content_type(idx, "application/json")

    def _read(self, row: dict[str, Any]) -> Raster:
        """The validated raster of one request.

        Raises:
            InvalidPayloadError: Neither GeoTIFF bytes nor a ``{"uri": "s3://..."}`` document.
            OversizedTileError, CorruptTileError, InvalidTileError: The raster breaks the input contract.
            ObjectNotFoundError: The URI names no object.
            StorageError: The object store is not configured or not reachable.

        """
        if self.served is None:
            raise RuntimeError("handler used before initialize()")
        band_count = self.served.arch_config().in_channels
        body = row.get("body", row.get("data")) if isinstance(row, dict) else None
        if body is None:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise InvalidPayloadError(f"request has no 'body' or 'data' part (got {keys}); send GeoTIFF bytes")
        if isinstance(body, str):
            body = body.encode()
        if isinstance(body, (bytes, bytearray)) and bytes(body[:1]) == b"{":
            try:
                body = json.loads(bytes(body))
            except ValueError as exc:
                raise InvalidPayloadError(f"body starts like JSON but is not: {exc}") from exc
        if isinstance(body, dict):
            uri = self._uri(body)
            return read_raster(self._fetch(uri), self.config.spec(band_count, from_uri=True))
        if isinstance(body, (bytes, bytearray)):
            return read_raster(bytes(body), self.config.spec(band_count, from_uri=False))
        raise InvalidPayloadError(f"body of type {type(body).__name__}; accepted: GeoTIFF bytes or a JSON object")

    @staticmethod
    def _uri(document: dict[str, Any]) -> str:
        if set(document) != {"uri"} or not isinstance(document["uri"], str):
            raise InvalidPayloadError(
                f'JSON body with keys {sorted(document)}; accepted: exactly {{"uri": "s3://bucket/key"}}'
            )
        uri: str = document["uri"]
        if not _S3_URI.match(uri):
            raise InvalidPayloadError(f"uri={uri!r}; accepted: s3://<bucket>/<key>")
        return uri

    def _client(self) -> Any:
        """The object-store client, built once from the environment (credentials never logged)."""
        if self._storage is None:
            endpoint, access, secret = _env("ENDPOINT"), _env("ACCESS_KEY"), _env("SECRET_KEY")
            missing = [n for n, v in (("ENDPOINT", endpoint), ("ACCESS_KEY", access), ("SECRET_KEY", secret)) if not v]
            if missing:
                names = ", ".join(f"TERRADAPT_S3__{n}" for n in missing)
                raise StorageError(f"object store not configured for URI requests: set {names} for TorchServe")
            # only URI requests need the client; the same construction as the workers' (CA file, TLS checks)
            from pydantic import SecretStr

            from serving.minio_store import minio_client
            from terradapt.settings import S3Config

            ca_file = _env("CA_FILE")
            self._storage = minio_client(
                S3Config(
                    endpoint=str(endpoint),
                    access_key=SecretStr(str(access)),
                    secret_key=SecretStr(str(secret)),
                    secure=(_env("SECURE") or "false").lower() == "true",
                    ca_file=Path(ca_file) if ca_file else None,
                )
            )
        return self._storage

    def _fetch(self, uri: str) -> bytes:
        """Read an object, refusing it from its size before downloading when it is too large."""
        match = _S3_URI.match(uri)
        if match is None:  # _uri checked it already
            raise InvalidPayloadError(f"uri={uri!r}; accepted: s3://<bucket>/<key>")
        bucket, key = match["bucket"], match["key"]
        client = self._client()
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            size = int(client.stat_object(bucket, key).size or 0)
            if size > self.config.max_object_bytes:
                raise OversizedTileError("bytes", size, f"at most {self.config.max_object_bytes} bytes")
            response = client.get_object(bucket, key)
            try:
                return read_bounded(response.stream(1 << 20), self.config.max_object_bytes, uri)
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}:
                raise ObjectNotFoundError(uri) from exc
            raise StorageError(f"object store refused {uri}: {exc.code}") from exc
        except HTTPError as exc:
            raise StorageError(f"object store unreachable for {uri}: {type(exc).__name__}") from exc
