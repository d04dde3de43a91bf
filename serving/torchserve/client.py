"""`TorchServeClient`: TorchServe's management and inference REST APIs with token auth, retries and typed errors.

Bearer tokens come from TorchServe's ``key_file.json`` (token auth stays on). Connection failures and 503 answers
are retried with exponential backoff, then raised as `TorchServeUnavailableError`, so a stream worker can
dead-letter the tile instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx

from terradapt.errors import ModelVersionNotFoundError, TerradaptError
from terradapt.settings import TorchServeConfig

logger = logging.getLogger(__name__)

Api = Literal["inference", "management"]


class TorchServeError(TerradaptError):
    """TorchServe answered, but not with what was asked."""

    reason = "torchserve_error"

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None) -> None:
        self.status = status
        self.kind = kind
        super().__init__(message)


class TorchServeUnavailableError(TorchServeError, ConnectionError):
    """TorchServe could not be reached after every retry (the caller dead-letters or retries later)."""

    reason = "torchserve_unavailable"


class TorchServeAuthError(TorchServeError, PermissionError):
    """The token was refused even after re-reading (and, with the API key, regenerating) it."""

    reason = "torchserve_auth"


class TorchServeConflictError(TorchServeError):
    """The model version is already registered (409)."""

    reason = "torchserve_conflict"


class PredictionRejectedError(TorchServeError):
    """The handler refused a request; ``reason`` is the handler's (``invalid_tile``, ``oversized_tile``...)."""

    def __init__(self, message: str, *, status: int, reason: str) -> None:
        super().__init__(message, status=status, kind="handler")
        self.reason = reason


# -- client -----------------------------------------------------------------------------------------------------
def read_keys(path: Path) -> dict[str, str]:
    """The bearer tokens of a TorchServe ``key_file.json``: ``{"management": ..., "inference": ..., "API": ...}``.

    Raises:
        TorchServeAuthError: The file is missing or malformed (TorchServe writes it on start, in its working dir).

    """
    try:
        data = json.loads(Path(path).read_text())
        return {kind: str(data[kind]["key"]) for kind in ("management", "inference", "API") if kind in data}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TorchServeAuthError(f"cannot read TorchServe key file {path}: {type(exc).__name__}") from exc


class TorchServeClient:
    """Typed calls of TorchServe's management and inference APIs.

    Connection failures (refused, reset, closed before answering) and 503 answers are retried ``config.retries``
    times with exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``), then raised as
    `TorchServeUnavailableError`. A refused token is re-read from the key file (another client may have rotated
    it), then regenerated with the API key, once per call.
    """

    def __init__(
        self,
        config: TorchServeConfig,
        *,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._keys: dict[str, str] = {}
        self._keys_lock = threading.Lock()
        timeout = httpx.Timeout(config.timeout_s, connect=min(5.0, config.timeout_s))
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self._base = {"inference": config.inference_url.rstrip("/"), "management": config.management_url.rstrip("/")}

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> TorchServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- management ---------------------------------------------------------------------------------------------
    def register(
        self,
        url: str,
        *,
        name: str,
        initial_workers: int = 1,
        synchronous: bool = True,
        timeout_s: float = 180.0,
    ) -> None:
        """Register an archive of the model store (``POST /models``); synchronous waits for its workers.

        Raises:
            TorchServeConflictError: That version of ``name`` is already registered.
            TorchServeError: Any other refusal (a worker that cannot load the archive answers 500).

        """
        params: dict[str, str | int] = {
            "url": url,
            "model_name": name,
            "initial_workers": initial_workers,
            "synchronous": str(synchronous).lower(),
        }
        self._json("management", "POST", "/models", params=params, timeout_s=timeout_s)

    def set_default(self, name: str, version: int | str) -> None:
        """Make ``version`` what ``/predictions/<name>`` serves (``PUT /models/<name>/<v>/set-default``)."""
        self._json("management", "PUT", f"/models/{name}/{version}/set-default")

    def unregister(self, name: str, version: int | str) -> None:
        """Unregister one version (TorchServe refuses the default one while others exist: 403)."""
        self._json("management", "DELETE", f"/models/{name}/{version}", timeout_s=120.0)

    def models(self) -> list[str]:
        """Names of every registered model."""
        data = self._json("management", "GET", "/models", params={"limit": 1000})
        return [str(m["modelName"]) for m in data.get("models", [])]

    def describe(self, name: str, version: int | str | None = None, *, customized: bool = False) -> list[Any]:
        """``GET /models/<name>[/<version>]``: without a version, the default version's description."""
        path = f"/models/{name}" if version is None else f"/models/{name}/{version}"
        params = {"customized": "true"} if customized else None
        data = self._json("management", "GET", path, params=params)
        return list(data) if isinstance(data, list) else [data]

    def versions(self, name: str) -> list[int]:
        """Registered versions of ``name``, sorted ([] when the model is not registered)."""
        try:
            data = self._json("management", "GET", f"/models/{name}/all")
        except ModelVersionNotFoundError:
            return []
        return sorted(int(m["modelVersion"]) for m in data)

    def default_version(self, name: str) -> int | None:
        """The version ``/predictions/<name>`` serves, or None when the model is not registered."""
        try:
            described = self.describe(name)
        except ModelVersionNotFoundError:
            return None
        return int(described[0]["modelVersion"]) if described else None

    # -- inference ----------------------------------------------------------------------------------------------
    def ping(self) -> bool:
        """Whether the frontend answers ``/ping`` as Healthy (no retries: a health probe must be quick)."""
        try:
            data = self._json("inference", "GET", "/ping", retries=0)
        except TorchServeError:
            return False
        return isinstance(data, dict) and data.get("status") == "Healthy"

    def predict(self, name: str, body: bytes | dict[str, Any], version: int | str | None = None) -> dict[str, Any]:
        """POST one GeoTIFF (bytes) or ``{"uri": "s3://..."}`` to the default or an explicit version URL.

        Raises:
            PredictionRejectedError: The handler refused the request (4xx with the handler's reason).
            ModelVersionNotFoundError: No such model or version is registered.
            TorchServeUnavailableError: TorchServe unreachable after every retry.

        """
        path = f"/predictions/{name}" if version is None else f"/predictions/{name}/{version}"
        if isinstance(body, dict):
            content, ctype = json.dumps(body).encode(), "application/json"
        else:
            content, ctype = body, "application/octet-stream"
        data = self._json("inference", "POST", path, content=content, headers={"Content-Type": ctype})
        if not isinstance(data, dict):
            raise TorchServeError(f"{path} answered {type(data).__name__}, expected a JSON object")
        return data

    def metrics(self) -> str:
        """The Prometheus exposition of the metrics endpoint (no token: it is not an API TorchServe guards)."""
        response = self._send(
            "GET", f"{self.config.metrics_url.rstrip('/')}/metrics", api=None, retries=self.config.retries
        )
        return response.text

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _json(
        self,
        api: Api,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> Any:
        url = self._base[api] + path
        response = self._send(
            method,
            url,
            api=api,
            params=params,
            content=content,
            headers=headers,
            timeout_s=timeout_s,
            retries=self.config.retries if retries is None else retries,
        )
        try:
            data = response.json() if response.content else {}
        except ValueError:
            data = {"message": response.text[:500]}
        if response.is_success:
            return data
        raise self._error(response.status_code, data, method, path)

    @staticmethod
    def _error(status: int, data: Any, method: str, path: str) -> TerradaptError:
        if isinstance(data, dict) and isinstance(data.get("error"), dict):  # our handler's answer
            err = data["error"]
            return PredictionRejectedError(
                str(err.get("message", "")), status=status, reason=str(err.get("reason", "error"))
            )
        kind = str(data.get("type", "")) if isinstance(data, dict) else ""
        message = str(data.get("message", "")) if isinstance(data, dict) else str(data)
        if status == 404 and kind in {"ModelNotFoundException", "ModelVersionNotFoundException"}:
            parts = path.strip("/").split("/")
            name = parts[1] if len(parts) > 1 else path
            version = parts[2] if len(parts) > 2 and parts[2] != "all" else "default"
            return ModelVersionNotFoundError(name, version)
        if status == 409:
            return TorchServeConflictError(f"{method} {path}: {message}", status=status, kind=kind)
        return TorchServeError(f"{method} {path} answered {status} {kind}: {message}", status=status, kind=kind)

    def _send(
        self,
        method: str,
        url: str,
        *,
        api: Api | None,
        retries: int,
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """One call with retries on connection failures and 503, and one token refresh on an auth refusal."""
        attempt, refreshed = 0, False
        timeout: Any = httpx.USE_CLIENT_DEFAULT if timeout_s is None else httpx.Timeout(timeout_s, connect=5.0)
        while True:
            auth = self._auth_header(api)
            try:
                response = self._http.request(
                    method, url, params=params, content=content, headers={**(headers or {}), **auth}, timeout=timeout
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt >= retries:
                    raise TorchServeUnavailableError(
                        f"{method} {url}: {type(exc).__name__} after {attempt + 1} attempt(s)", kind=type(exc).__name__
                    ) from exc
                self._backoff(attempt, f"{method} {url}: {type(exc).__name__}")
                attempt += 1
                continue
            except httpx.TimeoutException as exc:  # the server is slow: retrying would only pile up work
                raise TorchServeUnavailableError(f"{method} {url}: {type(exc).__name__}", kind="timeout") from exc
            if api is not None and self._auth_refused(response):
                if refreshed:
                    raise TorchServeAuthError(f"{method} {url}: token refused after refresh", status=400)
                self._refresh(api, used=auth)
                refreshed = True
                continue
            if response.status_code == 503 and attempt < retries:
                self._backoff(attempt, f"{method} {url}: 503")
                attempt += 1
                continue
            return response

    def _backoff(self, attempt: int, what: str) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        logger.warning("torchserve: %s; retry %d/%d in %.2fs", what, attempt + 1, self.config.retries, delay)
        self._sleep(delay)

    @staticmethod
    def _auth_refused(response: httpx.Response) -> bool:
        return response.status_code in (400, 401) and b"InvalidKeyException" in response.content[:200]

    def _auth_header(self, api: Api | None) -> dict[str, str]:
        if api is None or self.config.key_file is None:
            return {}
        with self._keys_lock:
            if not self._keys:
                # A (re)starting TorchServe has no key file yet: send without a token; the connection error is
                # retried, and a refusal from a server that is up re-reads the file (which then exists).
                with contextlib.suppress(TorchServeAuthError):
                    self._keys = read_keys(self.config.key_file)
            key = self._keys.get(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _refresh(self, api: Api, *, used: dict[str, str]) -> None:
        """Re-read the key file; if it still holds the refused key, regenerate it with the API key."""
        if self.config.key_file is None:
            raise TorchServeAuthError("TorchServe requires a token: set torchserve.key_file", status=400)
        with self._keys_lock:
            self._keys = read_keys(self.config.key_file)
            if {"Authorization": f"Bearer {self._keys.get(api)}"} != used:
                return
            api_key = self._keys.get("API")
        if not api_key:
            raise TorchServeAuthError(f"{api} token refused and no API key to regenerate it", status=400)
        response = self._http.get(
            f"{self._base['management']}/token",
            params={"type": api},
            headers={"Authorization": f"Bearer {api_key}"},
        )
        if not response.is_success:
            status = response.status_code
            raise TorchServeAuthError(f"token regeneration refused ({status})", status=status)
        with self._keys_lock:
            self._keys = read_keys(self.config.key_file)
        logger.info("torchserve: %s token regenerated", api)
