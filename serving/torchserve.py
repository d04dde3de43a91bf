"""TorchServe as terradapt's serving backend: a management/inference client, a Predictor and a Deployer.

* `TorchServeClient` speaks TorchServe's REST APIs with the bearer tokens of ``key_file.json`` (token auth stays
  on), retries connection failures with exponential backoff and then raises `TorchServeUnavailableError`, so a
  stream worker can dead-letter the tile instead of hanging.
* `TorchServePredictor` implements ``serving.predictor.Predictor`` over ``/predictions/landcover-<REGION>[/<v>]``
  and decodes the handler's JSON (``serving.codec``) into the same ``TileOutput`` the in-process predictor makes.
* `TorchServeDeployer` implements ``serving.rollout.Deployer`` from TorchServe's version primitives::

      package (registry -> .mar) -> register version (synchronous) -> shadow: candidate vs current default on the
      region's recent tiles, through the explicit version URLs -> set-default + registry alias -> post-rollout
      check on the default URL -> automatic rollback (set-default previous + alias back) -> prune old versions

  Every step is a ``RolloutEvent``. The registry is the source of truth; TorchServe's state is derived from it
  (`TorchServeDeployer.sync` rebuilds it after a TorchServe restart, which forgets every model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt
from affine import Affine
from pydantic import Field

from adapters.buffer import BufferedTile
from adapters.gate import GateConfig, GateResult, judge
from serving.codec import HandlerConfig, decode_prediction
from serving.packaging import archive_url, model_name, package_version, remove_archive
from serving.predictor import TileOutput
from serving.registry import ModelRegistry
from terradapt.errors import ModelVersionNotFoundError, TerradaptError
from terradapt.raster import Raster, raster_to_geotiff_bytes
from terradapt.records import RolloutEvent, RolloutStep
from terradapt.settings import StrictModel, TorchServeConfig

logger = logging.getLogger(__name__)

Api = Literal["inference", "management"]


# -- errors -----------------------------------------------------------------------------------------------------
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
            method, url, api=api, params=params, content=content, headers=headers, timeout_s=timeout_s,
            retries=self.config.retries if retries is None else retries,
        )  # fmt: skip
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


# -- predictor --------------------------------------------------------------------------------------------------
def encode_tile(image: npt.NDArray[np.uint8]) -> bytes:
    """A (C, H, W) uint8 array as GeoTIFF bytes (no CRS: the handler answers in pixel space)."""
    return raster_to_geotiff_bytes(Raster(np.ascontiguousarray(image, dtype=np.uint8), None, Affine.identity()))


class TorchServePredictor:
    """``Predictor`` over TorchServe: one request per tile, default version unless one is named.

    Args:
        client: The TorchServe client.
        on_missing: Called with the region when its model is not registered (for example
            ``TorchServeDeployer.sync``, which registers the registry's current version); the call is then retried
            once. Without it a missing model raises ``ModelVersionNotFoundError``.

    """

    def __init__(self, client: TorchServeClient, *, on_missing: Callable[[str], object] | None = None) -> None:
        self.client = client
        self.on_missing = on_missing

    def predict(
        self, region: str, images: Sequence[npt.NDArray[np.uint8]], version: int | None = None
    ) -> list[TileOutput]:
        """One output per image (C, H, W); large images are tiled by the handler."""
        return [self._predict(region, encode_tile(image), version) for image in images]

    def predict_uri(self, region: str, uri: str, version: int | None = None) -> TileOutput:
        """Predict an object the handler reads itself (``s3://bucket/key``): no upload size limit."""
        return self._predict(region, {"uri": uri}, version)

    def _predict(self, region: str, body: bytes | dict[str, Any], version: int | None) -> TileOutput:
        name = model_name(region)
        try:
            return decode_prediction(self.client.predict(name, body, version))
        except ModelVersionNotFoundError:
            if self.on_missing is None:
                raise
            self.on_missing(region)
            return decode_prediction(self.client.predict(name, body, version))


# -- shadow evaluation ------------------------------------------------------------------------------------------
def compare_outputs(
    candidate: Sequence[TileOutput],
    current: Sequence[TileOutput],
    num_classes: int,
    config: GateConfig,
    masks: Sequence[npt.NDArray[np.uint8] | None] | None = None,
    reference: Sequence[float] | None = None,
    prior: Sequence[float] | None = None,
) -> GateResult:
    """The safety gate's checks (``adapters.gate``), on the *served* outputs of two versions for the same tiles.

    ``adapters.gate.Gate`` judges in-process models before publication; this judges what TorchServe actually
    serves, through the explicit version URLs, with the same thresholds: entropy collapse, class collapse,
    class-distribution jump and agreement (both waived when the candidate moves toward the reference class mix),
    and labelled mIoU when masks are given.
    """
    if not candidate or len(candidate) != len(current):
        raise ValueError(f"need the same non-zero number of outputs, got {len(candidate)} and {len(current)}")
    return judge(
        [o.class_map for o in candidate],
        [o.features.mean_entropy for o in candidate],
        [o.class_map for o in current],
        [o.features.mean_entropy for o in current],
        num_classes,
        config,
        masks,
        reference,
        prior,
    )


# -- deployer ---------------------------------------------------------------------------------------------------
class RolloutConfig(StrictModel):
    """How the TorchServe deployer checks and keeps versions."""

    gate: GateConfig = Field(default_factory=GateConfig)
    shadow_tiles: int = Field(default=16, ge=1, description="most recent tiles compared in the shadow step")
    min_shadow_tiles: int = Field(
        default=1, ge=1, description="fewer recent tiles than this: the candidate is refused (fail closed)"
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


#: An extra post-rollout check: (region, version) -> a problem description, or None when fine.
PostCheck = Callable[[str, int], str | None]


def _short(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class TorchServeDeployer:
    """``Deployer`` over TorchServe: canary on the explicit version URL, set-default, automatic rollback.

    Args:
        client: TorchServe client (management + inference).
        registry: Where versions, aliases and lineage live (the source of truth).
        model_store: TorchServe's model store folder (archives are written there).
        recent_tiles: The region's recent tiles (e.g. ``adapters.buffer.TileBuffer.recent``); masks, when present,
            add the labelled mIoU check.
        config: Shadow/post-check/prune settings.
        handler_config: Settings packaged with every archive.
        post_checks: Extra post-rollout checks (e.g. an error rate read from Prometheus); any problem rolls back.
        on_event: Called with every RolloutEvent (e.g. a Kafka producer); events are also kept in ``events``.
        max_events: Bound of ``events`` (a long-running worker must not grow without limit).

    """

    def __init__(
        self,
        client: TorchServeClient,
        registry: ModelRegistry,
        model_store: Path,
        recent_tiles: Callable[[str], Sequence[BufferedTile]],
        *,
        config: RolloutConfig | None = None,
        handler_config: HandlerConfig | None = None,
        post_checks: Sequence[PostCheck] = (),
        on_event: Callable[[RolloutEvent], None] | None = None,
        max_events: int = 1000,
    ) -> None:
        self.client = client
        self.registry = registry
        self.model_store = Path(model_store)
        self.recent_tiles = recent_tiles
        self.config = config or RolloutConfig()
        self.handler_config = handler_config or HandlerConfig()
        self.post_checks = tuple(post_checks)
        self.on_event = on_event
        self.events: deque[RolloutEvent] = deque(maxlen=max_events)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- Deployer -----------------------------------------------------------------------------------------------
    def rollout(self, region: str, version: int) -> RolloutEvent:
        """Register, shadow-check, promote, post-check (rolling back on failure) and prune; one region at a time.

        Returns:
            The decisive event: PROMOTED, SHADOW_FAILED (candidate unregistered, alias untouched) or ROLLED_BACK
            (previous version default again, alias moved back, candidate unregistered).

        Raises:
            TorchServeUnavailableError: TorchServe unreachable (the alias is only moved after set-default worked).
            ModelVersionNotFoundError: ``version`` is not in the registry.

        """
        with self._lock(region):
            name = model_name(region)
            current = self.sync(region)
            if version == current:
                return self._event(region, version, RolloutStep.PROMOTED, current, "already the current version")
            self.registry.manifest(region, version)  # fail early on an unknown version
            seconds = self._register(region, version)
            detail = f"{archive_url(region, version)} in {seconds:.1f}s"
            self._event(region, version, RolloutStep.REGISTERED, current, detail)
            verdict, tiles, canary = self._shadow(region, version, current)
            if not verdict.accepted:
                self._discard(region, version)
                detail = "; ".join(verdict.reasons) + (f" | {_short(verdict.metrics)}" if verdict.metrics else "")
                return self._event(region, version, RolloutStep.SHADOW_FAILED, current, detail)
            self._event(region, version, RolloutStep.SHADOW_PASSED, current, _short(verdict.metrics))
            self._promote(region, version, current)
            promoted = self._event(region, version, RolloutStep.PROMOTED, current, f"default of {name}")
            problems = self._post_check(region, version, tiles, canary)
            if problems:
                self._promote(region, current, version)
                self._discard(region, version)  # judged bad: free its worker; the registry keeps the weights
                detail = "post-rollout check failed: " + "; ".join(problems)
                return self._event(region, current, RolloutStep.ROLLED_BACK, version, detail)
            self.prune(region)
            return promoted

    def rollback(self, region: str) -> RolloutEvent:
        """Serve the region's previous version again (registered again from the registry if it was pruned)."""
        with self._lock(region):
            current = self.registry.current(region)
            previous = self.registry.previous(region)
            target = 0 if previous is None else previous
            if target == current:
                return self._event(region, current, RolloutStep.ROLLED_BACK, current, "nothing to roll back to")
            self._ensure_registered(region, target)
            self._promote(region, target, current)
            return self._event(region, target, RolloutStep.ROLLED_BACK, current, "rollback requested")

    # -- state ----------------------------------------------------------------------------------------------------
    def sync(self, region: str) -> int:
        """Make TorchServe serve the registry's current version of ``region`` by default; return that version.

        Used at start-up, after a TorchServe restart (it forgets every model: the config runs without snapshots)
        and by `TorchServePredictor` when a region's model is missing.
        """
        current = self.registry.current(region)
        name = model_name(region)
        self._ensure_registered(region, current)
        if self.client.default_version(name) != current:
            self.client.set_default(name, current)
        return current

    def prune(self, region: str) -> list[RolloutEvent]:
        """Unregister (and delete the archives of) versions beyond ``keep_versions``, oldest first.

        The source (0), current and previous versions are never pruned; registry weights are kept unless
        ``prune_registry`` (the registry itself refuses to delete source, current and previous).
        """
        name = model_name(region)
        protected = {0, self.registry.current(region), self.registry.previous(region)}
        registered = self.client.versions(name)
        excess = len(registered) - self.config.keep_versions
        events = []
        for v in sorted(v for v in registered if v not in protected):
            if excess <= 0:
                break
            self.client.unregister(name, v)
            remove_archive(self.model_store, region, v)
            if self.config.prune_registry:
                self.registry.delete(region, v)
            excess -= 1
            events.append(self._event(region, v, RolloutStep.PRUNED, None, f"unregistered from {name}"))
        return events

    # -- steps ----------------------------------------------------------------------------------------------------
    def _register(self, region: str, version: int) -> float:
        t0 = time.perf_counter()
        package_version(self.registry, region, version, self.model_store, config=self.handler_config)
        try:
            self.client.register(
                archive_url(region, version),
                name=model_name(region),
                initial_workers=self.config.initial_workers,
                timeout_s=self.config.register_timeout_s,
            )
        except TorchServeConflictError:
            logger.info("%s v%d already registered", model_name(region), version)
        return time.perf_counter() - t0

    def _ensure_registered(self, region: str, version: int) -> None:
        if version not in self.client.versions(model_name(region)):
            self._register(region, version)

    def _shadow(
        self, region: str, version: int, current: int
    ) -> tuple[GateResult, list[BufferedTile], list[TileOutput]]:
        """Candidate and current default predict the same recent tiles through their explicit version URLs."""
        tiles = list(self.recent_tiles(region))[-self.config.shadow_tiles :]
        if len(tiles) < self.config.min_shadow_tiles:
            reason = f"only {len(tiles)} recent tile(s), shadow evaluation needs {self.config.min_shadow_tiles}"
            return GateResult(False, (reason,), {}), tiles, []
        predictor = TorchServePredictor(self.client)
        images = [t.image for t in tiles]
        canary = predictor.predict(region, images, version=version)
        baseline = predictor.predict(region, images, version=current)
        manifest = self.registry.manifest(region, version)
        verdict = compare_outputs(
            canary,
            baseline,
            manifest.unet_config().num_classes,
            self.config.gate,
            masks=[t.mask for t in tiles],
            prior=manifest.class_prior or None,
        )
        return verdict, tiles, canary

    def _promote(self, region: str, version: int, previous: int) -> None:
        """TorchServe default first, then the registry alias; undo the former if the latter fails."""
        name = model_name(region)
        self.client.set_default(name, version)
        try:
            self.registry.set_current(region, version)
        except Exception:
            self.client.set_default(name, previous)
            raise

    def _post_check(
        self, region: str, version: int, tiles: Sequence[BufferedTile], canary: Sequence[TileOutput]
    ) -> list[str]:
        """The default URL must now answer with the new version, exactly as the canary did; then extra checks."""
        problems: list[str] = []
        name = model_name(region)
        default = self.client.default_version(name)
        if default != version:
            problems.append(f"{name} default is v{default}, expected v{version}")
        predictor = TorchServePredictor(self.client)
        n = min(self.config.post_check_tiles, len(tiles))
        for tile, expected in zip(tiles[:n], canary[:n], strict=True):
            try:
                out = predictor.predict(region, [tile.image])[0]
            except TerradaptError as exc:
                problems.append(f"default URL failed on {tile.acquisition_id}: {exc.reason}")
                continue
            if out.version != version:
                problems.append(f"default URL answered with v{out.version} for {tile.acquisition_id}")
            elif not np.array_equal(out.class_map, expected.class_map):
                problems.append(f"default URL output differs from the canary on {tile.acquisition_id}")
        for check in self.post_checks:
            problem = check(region, version)
            if problem:
                problems.append(problem)
        return problems

    def _discard(self, region: str, version: int) -> None:
        """A refused candidate leaves TorchServe (its weights stay in the registry, flagged by the event)."""
        with contextlib.suppress(ModelVersionNotFoundError):
            self.client.unregister(model_name(region), version)
        remove_archive(self.model_store, region, version)

    def _event(self, region: str, version: int, step: RolloutStep, previous: int | None, detail: str) -> RolloutEvent:
        event = RolloutEvent(region=region, version=version, step=step, previous=previous, detail=detail)
        self.events.append(event)
        logger.info("rollout %s v%d %s (previous %s): %s", region, version, step.value, previous, detail)
        if self.on_event is not None:
            self.on_event(event)
        return event

    def _lock(self, region: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(region, threading.Lock())
