"""The adapt-or-reset policy: what one adaptation job makes of a region's recent tiles.

Every version is the *source* model adapted once on the region's tiles since the detection: versions never
compound adaptations (each adapts from its own predictions, so errors would pile up on an endless stream). A
region already on an adapted version raised a new alarm because its data left what that version was adapted to;
if its tiles, seen by the source model, no longer show covariate shift against the source-calibrated monitor,
the right model is the source model again (a version with method ``source``), not a further adaptation.

Inside one job, ``ResetPolicy`` (``adaptation.reset``) can also send the adapter back to the source weights when
a label-free degradation signal stays high for ``patience`` batches, or every ``period`` batches: the class mix
the adapted model predicts moving *away* from the expected mix (the label-shift estimate, else the source prior)
faster than the source model's is how collapse starts.
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapters.base import Adapter
from adapters.buffer import BufferedTile
from adapters.config import AdaptationConfig, ResetConfig
from adapters.gate import Gate, GateContext, GateResult
from adapters.registry import create_adapter
from adapters.selection import Selector
from monitoring.features import TileFeatures, forward_with_features
from monitoring.label_shift import BBSE
from monitoring.monitor import RegionMonitor
from terradapt.checkpoint import ModelManifest, encode
from terradapt.metrics import total_variation
from terradapt.model import SegmentationModel, select_device
from terradapt.records import AdaptationJob

log = logging.getLogger(__name__)


def source_features(
    source: SegmentationModel, tiles: Sequence[BufferedTile], device: str = "auto", batch: int = 4
) -> list[TileFeatures]:
    """The source model's features of the job's tiles (what the source-calibrated monitor and BBSE read)."""
    dev = select_device(device)
    model = source.to(dev).eval()
    out: list[TileFeatures] = []
    for i in range(0, len(tiles), batch):
        arr = np.stack([t.image for t in tiles[i : i + batch]])
        out.extend(forward_with_features(model, torch.from_numpy(arr).float().to(dev), arr).features)
    return out


def label_shift_estimate(features: Sequence[TileFeatures], confusion: np.ndarray | None) -> tuple[float, ...] | None:
    """BBSE estimate of the region's class mix from the source model's predicted shares (None without labels)."""
    if confusion is None or not features:
        return None
    shares = np.mean([f.class_shares for f in features], axis=0)
    return BBSE(confusion).estimate(shares).as_tuple()


def shifted_from_source(features: Sequence[TileFeatures], monitor: RegionMonitor) -> bool:
    """Whether the tiles, seen by the source model, show covariate shift against a fresh source-calibrated monitor.

    Fewer tiles than one test window give no evidence either way: the region keeps adapting.
    """
    updates = [monitor.update(f, 0) for f in features]
    if not any(any(u.scores.values()) for u in updates):
        return True
    return any(u.covariate_shift for u in updates)


def _context(
    job: AdaptationJob,
    feats: Sequence[TileFeatures],
    manifest: ModelManifest,
    confusion: np.ndarray | None,
    selector: Selector | None = None,
    method: str = "",
) -> GateContext:
    label_shift = job.label_shift if job.label_shift is not None else label_shift_estimate(feats, confusion)
    return GateContext(
        label_shift=label_shift,
        prior=manifest.class_prior or None,
        covariate=job.trigger.covariate,
        selector=selector,
        method=method,
    )


def gate_context(
    job: AdaptationJob,
    tiles: Sequence[BufferedTile],
    source: SegmentationModel,
    source_manifest: ModelManifest,
    confusion: np.ndarray | None,
    device: str = "auto",
    *,
    selector: Selector | None = None,
    method: str = "",
) -> GateContext:
    """The gate context of a job: label-shift estimate, prior, covariate evidence, selector, candidate method.

    The label-shift estimate comes from the source model's view of the job's tiles. What ``adapt_or_reset``
    judges with; a redelivered job whose version was published but not rolled out gets
    the same context for its rollout.
    """
    if job.label_shift is not None or confusion is None:
        return _context(job, (), source_manifest, confusion, selector, method)
    return _context(job, source_features(source, tiles, device), source_manifest, confusion, selector, method)


def adapt_or_reset(
    job: AdaptationJob,
    tiles: Sequence[BufferedTile],
    source: SegmentationModel,
    source_manifest: ModelManifest,
    config: AdaptationConfig,
    *,
    new_monitor: Callable[[], RegionMonitor],
    confusion: np.ndarray | None = None,
    current: SegmentationModel | None = None,
    selector: Selector | None = None,
) -> AdaptationOutcome:
    """The version one job makes: the source model adapted on ``tiles``, or the source weights again.

    Args:
        job: The job (its ``label_shift`` is filled from ``confusion`` when absent).
        tiles: The region's tiles since the detection.
        source: The source model (every version adapts from it).
        source_manifest: Its manifest (class prior, lineage).
        config: The adapting process's adaptation settings (method per region, gate, reset).
        new_monitor: A fresh source-calibrated monitor (decides whether the shift went away).
        confusion: The source confusion matrix ``[pred, true]`` of the calibration, for BBSE.
        current: The model the region serves now (the gate compares with it); ``None`` = the source.
        selector: The label-free estimator of the candidate's mIoU change (None: the gate's heuristics decide).

    Returns:
        The candidate with its gate result and the gate context (what a TorchServe shadow check must reuse).

    """
    feats = source_features(source, tiles, config.device)
    context = _context(job, feats, source_manifest, confusion, selector, config.method_for(job.region).method)
    job = job.model_copy(update={"label_shift": context.label_shift})
    if job.base_version != 0 and not shifted_from_source(feats, new_monitor()):
        return reset_to_source(job, source, source_manifest, tiles, context)
    return run_adaptation(job, source, source_manifest, tiles, config, context=context, current=current)


# -- one adaptation run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptationOutcome:
    """The candidate version (weights + manifest, gate decision inside), the gate result and what it judged with."""

    model: SegmentationModel
    weights: bytes
    manifest: ModelManifest
    gate: GateResult
    context: GateContext


def _batches(tiles: torch.Tensor, batch_size: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(tiles.shape[0], generator=g)
        for i in range(0, len(order), batch_size):
            yield tiles[order[i : i + batch_size]]


def run_adaptation(
    job: AdaptationJob,
    base: SegmentationModel,
    base_manifest: ModelManifest,
    tiles: Sequence[BufferedTile],
    config: AdaptationConfig,
    *,
    context: GateContext | None = None,
    source_tiles: torch.Tensor | None = None,
    current: SegmentationModel | None = None,
) -> AdaptationOutcome:
    """Adapt ``base`` on ``tiles`` with the method ``config`` names for the job's region, gate it, build its manifest.

    The method and its config always come from ``config`` (the adapting process's settings): ``job.method`` only
    records what the stream worker's settings named when it issued the job, and a mismatch is logged. The gate
    compares the candidate with ``current`` (the version the region serves), ``base`` when not given, with
    ``context`` (label-shift estimate, source prior, covariate evidence). ``source_tiles`` (N, C, H, W) feed the
    methods that replay source data (coral, dann; eata's Fisher).
    """
    if not tiles:
        raise ValueError("an adaptation job needs at least one tile")
    device = select_device(config.device)
    torch.manual_seed(zlib.crc32(job.job_id.encode()))
    x = torch.from_numpy(np.stack([t.image for t in tiles])).float().to(device)
    base = base.to(device).eval()
    chosen = config.method_for(job.region)
    if job.method and job.method != chosen.method:
        log.warning(
            "job %s names %s; this worker's settings say %s for %s: using %s",
            job.job_id,
            job.method,
            chosen.method,
            job.region,
            chosen.method,
        )
    context = context or GateContext(prior=base_manifest.class_prior or None, covariate=job.trigger.covariate)
    prior = torch.tensor(context.prior, dtype=torch.float32) if context.prior else None
    adapter = create_adapter(chosen.method, base, chosen.method_config, source_tiles=source_tiles, class_prior=prior)
    batches = _batches(x, config.batch_size, config.epochs, seed=len(tiles))
    if config.reset is not None:
        mix = context.label_shift or context.prior
        reference = torch.tensor(mix if mix else [1.0 / base.config.num_classes] * base.config.num_classes)
        candidate = adapt_with_resets(adapter, batches, ResetPolicy(config.reset), base, reference.float())
    else:
        candidate = adapter.adapt(batches)
    masks = [t.mask for t in tiles]
    reference_model = base if current is None else current.to(device).eval()
    result = Gate(config.gate).check(candidate, reference_model, x, context, masks)
    manifest = base_manifest.model_copy(
        update={
            "region": job.region,
            "parent": job.base_version,
            "method": adapter.name,
            "gate_accepted": result.accepted,
            "gate_reasons": result.reasons,
            "gate_metrics": result.metrics,
            "data_window": tuple(t.acquisition_id for t in tiles),
            "job_id": job.job_id,
            "metrics": {},
        }
    )
    candidate = candidate.cpu()
    weights, manifest_json = encode(candidate, manifest)
    return AdaptationOutcome(candidate, weights, ModelManifest.model_validate_json(manifest_json), result, context)


def reset_to_source(
    job: AdaptationJob,
    source: SegmentationModel,
    source_manifest: ModelManifest,
    tiles: Sequence[BufferedTile],
    context: GateContext | None = None,
) -> AdaptationOutcome:
    """A version that serves the source weights again (the region's shift went away).

    Published like any version (new number, lineage, data window), so rollout, canary and rollback treat it the
    same; the source model is the validated baseline, so it needs no label-free gate.
    """
    result = GateResult(accepted=True, reasons=(), metrics={"reset_to_source": 1.0, "tiles": float(len(tiles))})
    manifest = source_manifest.model_copy(
        update={
            "region": job.region,
            "parent": job.base_version,
            "method": "source",
            "gate_accepted": True,
            "gate_reasons": (),
            "gate_metrics": result.metrics,
            "data_window": tuple(t.acquisition_id for t in tiles),
            "job_id": job.job_id,
            "metrics": {},
        }
    )
    weights, manifest_json = encode(source.cpu(), manifest)
    ctx = context or GateContext(prior=source_manifest.class_prior or None)
    return AdaptationOutcome(source, weights, ModelManifest.model_validate_json(manifest_json), result, ctx)


# -- in-job reset policy -----------------------------------------------------------------------------------------
def _shares(model: SegmentationModel, batch: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    counts = torch.bincount(model(batch).argmax(dim=1).flatten(), minlength=model.config.num_classes).float()
    model.train(was_training)
    return counts / counts.sum()


@torch.no_grad()
def class_drift(
    adapted: SegmentationModel, source: SegmentationModel, batch: torch.Tensor, reference: torch.Tensor
) -> float:
    """How much farther (total variation) the adapted model's class mix is from ``reference`` than the source's.

    Positive when adaptation moved the predictions *away* from the expected mix (collapse onto a few classes),
    zero or negative when it moved them toward it (a repaired covariate shift). Blind to the harm of pulling
    predictions toward the reference under genuine label shift: the gate's labelled check covers that.
    """
    ref = reference.cpu().numpy()
    return total_variation(_shares(adapted, batch).cpu().numpy(), ref) - total_variation(
        _shares(source, batch).cpu().numpy(), ref
    )


class ResetPolicy:
    """Decides after each batch whether the adapter goes back to source."""

    def __init__(self, config: ResetConfig | None = None) -> None:
        self.config = config or ResetConfig()
        self.recent: deque[float] = deque(maxlen=self.config.patience)
        self.steps = 0
        self.resets = 0

    def update(self, signal: float) -> bool:
        """Record one batch's degradation signal; True when the adapter should be reset now."""
        self.steps += 1
        self.recent.append(signal)
        sustained = len(self.recent) == self.config.patience and min(self.recent) > self.config.threshold
        periodic = self.config.period is not None and self.steps % self.config.period == 0
        if sustained or periodic:
            self.resets += 1
            self.recent.clear()
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Windows and counters."""
        return {"recent": list(self.recent), "steps": self.steps, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        self.recent = deque(state["recent"], maxlen=self.config.patience)
        self.steps, self.resets = int(state["steps"]), int(state["resets"])


def adapt_with_resets(
    adapter: Adapter,
    batches: Iterable[torch.Tensor],
    policy: ResetPolicy,
    source: SegmentationModel,
    reference: torch.Tensor,
) -> SegmentationModel:
    """``adapter.adapt`` with the policy consulted after every batch (signal: ``class_drift``)."""
    device = next(adapter.model.parameters()).device
    source = source.to(device)
    for batch in batches:
        batch = batch.to(device)
        adapter.adapt_step(batch)
        if policy.update(class_drift(adapter.model, source, batch, reference)):
            adapter.reset()
    adapter.model.eval()
    return adapter.model
