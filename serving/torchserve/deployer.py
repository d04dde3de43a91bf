"""`TorchServeDeployer`: the ``serving.rollout.Deployer`` contract from TorchServe's version primitives.

The rollout of one version::

      package (registry -> .mar) -> register version (synchronous) -> shadow: candidate vs current default on the
      job's tiles, through the explicit version URLs, judged by the same gate and context as in-process ->
      set-default + registry alias -> post-rollout check on the default URL -> automatic rollback (set-default
      previous + alias back) -> prune old versions

Every step is a ``RolloutEvent``. The registry is the source of truth; TorchServe's state is derived from it
(`TorchServeDeployer.sync` rebuilds it after a TorchServe restart, which forgets every model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from adapters.buffer import BufferedTile
from adapters.gate import GateConfig, GateContext, GateResult, judge
from serving.codec import HandlerConfig
from serving.packaging import archive_url, model_name, package_version, remove_archive
from serving.predictor import TileOutput
from serving.registry import ModelRegistry
from serving.rollout import RolloutContext
from serving.torchserve.client import TorchServeClient, TorchServeConflictError
from serving.torchserve.predictor import TorchServePredictor
from terradapt.errors import ModelVersionNotFoundError, TerradaptError
from terradapt.records import RolloutEvent, RolloutStep
from terradapt.settings import RolloutConfig

logger = logging.getLogger(__name__)


# -- shadow evaluation ------------------------------------------------------------------------------------------
def compare_outputs(
    candidate: Sequence[TileOutput],
    current: Sequence[TileOutput],
    num_classes: int,
    config: GateConfig,
    context: GateContext | None = None,
    masks: Sequence[npt.NDArray[np.uint8] | None] | None = None,
) -> GateResult:
    """The safety gate's checks (``adapters.gate``), on the *served* outputs of two versions for the same tiles.

    ``adapters.gate.Gate`` judges in-process models before publication; this judges what TorchServe actually
    serves, through the explicit version URLs, with the same thresholds and the same context (label-shift
    estimate, source prior, covariate flag): entropy collapse, class collapse, class-distribution jump and
    agreement (both waived when the candidate moves toward the reference class mix), and labelled mIoU when
    masks are given.
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
        context,
        masks,
        candidate_confidence=[o.features.mean_confidence for o in candidate],
        current_confidence=[o.features.mean_confidence for o in current],
    )


# -- deployer ---------------------------------------------------------------------------------------------------
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
        gate: The gate's thresholds (the same ``adaptation.gate`` settings the in-process gate uses).
        config: Shadow/post-check/prune settings (``torchserve.rollout``).
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
        *,
        gate: GateConfig | None = None,
        config: RolloutConfig | None = None,
        handler_config: HandlerConfig | None = None,
        post_checks: Sequence[PostCheck] = (),
        on_event: Callable[[RolloutEvent], None] | None = None,
        max_events: int = 1000,
    ) -> None:
        self.client = client
        self.registry = registry
        self.model_store = Path(model_store)
        self.gate = gate or GateConfig()
        self.config = config or RolloutConfig()
        self.handler_config = handler_config or HandlerConfig()
        self.post_checks = tuple(post_checks)
        self.on_event = on_event
        self.events: deque[RolloutEvent] = deque(maxlen=max_events)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- Deployer -----------------------------------------------------------------------------------------------
    def rollout(self, region: str, version: int, context: RolloutContext | None = None) -> RolloutEvent:
        """Register, shadow-check, promote, post-check (rolling back on failure) and prune; one region at a time.

        ``context`` holds the job's tiles (the shadow step predicts them with both versions) and the gate context
        the in-process gate judged the candidate with; without tiles the candidate is refused (fail closed).

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
            verdict, tiles, canary = self._shadow(region, version, current, context or RolloutContext())
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
        self, region: str, version: int, current: int, context: RolloutContext
    ) -> tuple[GateResult, list[BufferedTile], list[TileOutput]]:
        """Candidate and current default predict the job's tiles through their explicit version URLs."""
        tiles = list(context.tiles)[-self.config.shadow_tiles :]
        if len(tiles) < self.config.min_shadow_tiles:
            reason = f"only {len(tiles)} recent tile(s), shadow evaluation needs {self.config.min_shadow_tiles}"
            return GateResult(False, (reason,), {}), tiles, []
        predictor = TorchServePredictor(self.client)
        images = [t.image for t in tiles]
        canary = predictor.predict(region, images, version=version)
        baseline = predictor.predict(region, images, version=current)
        manifest = self.registry.manifest(region, version)
        gate_context = context.gate
        if gate_context.prior is None and manifest.class_prior:
            gate_context = dataclasses.replace(gate_context, prior=manifest.class_prior)
        verdict = compare_outputs(
            canary,
            baseline,
            manifest.arch_config().num_classes,
            self.gate,
            gate_context,
            masks=[t.mask for t in tiles],
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
