"""Few-label adaptation: fine-tune the source model on a region's first labelled tiles, judged on held-out labels.

Why labels change the picture: the label-free methods cannot tell a repair from damage (shared/FINDINGS.md), while
even two labelled tiles of a region measure it directly. With so few labels, plain fine-tuning overfits and
forgets what the source model knew, so the fine-tune is anchored to the source weights (L2-SP: the squared distance
to the source parameters is added to the loss, so a weight moves only as far as the labels pay for), runs a fixed
small number of steps on random crops with flips and rotations, and never compounds: every version is the
*source* model fine-tuned once, like every label-free version.

The unlabelled term is BatchNorm re-estimation on every target image the job has (the unlabelled tiles and the
labelled tiles' images), done once *before* fine-tuning, after which BatchNorm stays in eval mode. Why this term
and not entropy minimisation or pseudo-labels: it has no loss to run away with (entropy minimisation collapses
onto few classes, pseudo-labels confirm the source model's errors, and with few labels nothing would catch it),
it repairs exactly what covariate shift breaks (the activation statistics), and the labelled fine-tune that
follows learns its weights under the statistics the version is served with. Batch statistics of a handful of
crops of K tiles would be far noisier than statistics pooled over every target pixel, which is why BatchNorm is
frozen during the fine-tune. Its known failure (pulling predictions toward the source class mix under label
shift) is what the labelled evaluation below catches.

Evaluation of a procedure, not of the shipped weights: labels never evaluate a version they trained. With K
labelled tiles, ``run_few_shot`` runs the same procedure in folds (leave-one-out up to ``max_folds`` tiles,
K-fold beyond): each fold fine-tunes on the other tiles (their images and masks; the held-out tile's image is
not used either) and scores candidate and current model on its held-out tile(s). The pooled held-out mIoU
decides; the *shipped* model is then trained on all K labels and is never scored on them. Fold scores and which
fold held out each tile are kept in the manifest's ``gate_metrics``, the labels that trained it in
``labels_used``. Held-out tiles that trained the *current* version (a previous few-shot version's
``labels_used``) are not scored: its score on them would be a training score.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adapters.buffer import BufferedTile
from adapters.common import PooledBNStats
from adapters.gate import GateContext, GateResult
from terradapt.checkpoint import ModelManifest, encode
from terradapt.classes import IGNORE_INDEX
from terradapt.errors import TerradaptError
from terradapt.metrics import confusion_matrix, miou
from terradapt.model import SegmentationModel, bn_layers, select_device
from terradapt.records import AdaptationJob, DriftEvent
from terradapt.settings import StrictModel

if TYPE_CHECKING:  # adapters.policy imports adapters.config, which imports this module: the type only
    from adapters.policy import AdaptationOutcome

METHOD = "few-shot"
Array = npt.NDArray[np.uint8]


class FewShotConfig(StrictModel):
    """When a region's labels make a few-shot job, how it fine-tunes, and how much worse its folds may score.

    Off by default because of its CPU cost: one job is ``min(K, max_folds) + 1`` fine-tunes of ``steps`` steps
    (measured on the demo's 256 px, 16-channel U-Net on one core: about 0.4 s a step, about 70 s for a K = 2 job),
    and the demo labels every tile.
    """

    enabled: bool = Field(default=False, description="keep delayed labels per region and run few-shot jobs")
    min_labels: int = Field(default=2, ge=2, description="labelled tiles of a region before the first job (K)")
    refit_growth: float = Field(
        default=2.0, ge=1.0, description="next job once the label count grew by this factor (1 = every new label)"
    )
    max_labels: int = Field(default=64, ge=2, description="most recent labelled tiles kept (and used) per region")
    max_folds: int = Field(default=5, ge=2, description="leave-one-out up to this many labels, K-fold beyond")
    steps: int = Field(default=60, ge=1, description="optimiser steps of one fine-tune")
    lr: float = Field(default=3e-3, gt=0.0)
    batch_size: int = Field(default=4, ge=1, description="random crops per step")
    crop: int = Field(default=128, ge=8, description="crop size (px), capped at the tile size")
    l2sp: float = Field(default=0.1, ge=0.0, description="weight of the squared distance to the source weights")
    unlabelled_weight: float = Field(
        default=1.0, ge=0.0, le=1.0, description="weight of the target BatchNorm statistics against the source's"
    )
    max_miou_drop: float = Field(default=0.0, ge=0.0, description="allowed pooled held-out mIoU loss (fraction)")

    def due(self, count: int) -> bool:
        """Whether a region's ``count``-th labelled tile makes a job: at K, then each time the count grew enough.

        Why not every label: a job costs ``min(K, max_folds) + 1`` fine-tunes, and a model trained on 33 labels
        is rarely better than one on 32. Growing by a factor keeps the jobs per region logarithmic in its labels.
        The schedule depends on the count alone, so a replayed label re-emits the same job (same id: idempotent).
        """
        milestone = self.min_labels
        while milestone < count:
            milestone = max(milestone + 1, math.ceil(milestone * self.refit_growth))
        return milestone == count


class TooFewLabelsError(TerradaptError, ValueError):
    """A few-shot job found fewer readable labelled tiles than a held-out evaluation needs (two)."""

    reason = "too_few_labels"


# -- the procedure ------------------------------------------------------------------------------------------------
def _crops(
    images: Sequence[Array], masks: Sequence[Array], size: int, crop: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of random labelled tiles, each rotated by a multiple of 90 degrees and maybe mirrored.

    Aerial tiles have no "up": rotations and mirrors are free extra labels, which matters most with two tiles.
    """
    c = min(crop, *(m.shape[0] for m in masks), *(m.shape[1] for m in masks))
    xs, ys = [], []
    for i in rng.integers(0, len(images), size=size):
        h, w = masks[i].shape
        r0, c0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        x, y = images[i][:, r0 : r0 + c, c0 : c0 + c], masks[i][r0 : r0 + c, c0 : c0 + c]
        k = int(rng.integers(0, 4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).long()


@torch.no_grad()
def reestimate_bn(model: SegmentationModel, tiles: Sequence[torch.Tensor], weight: float, batch_size: int = 4) -> None:
    """Blend every BatchNorm's running statistics toward those pooled over ``tiles`` (each (C, H, W)).

    ``weight`` 1 takes the target statistics, 0 keeps the source's. Tiles of equal size are forwarded together;
    the pooled sums (``PooledBNStats``) give the variance over all target pixels whatever the batch size.
    """
    if weight == 0.0 or not tiles:
        return
    layers = bn_layers(model)
    source = [(m.clone(), v.clone()) for m, v in _stats(layers)]
    model.eval()
    for bn in layers:
        bn.train()  # batch statistics in the forward (AdaBN), which the pooled hook records
    pooled = PooledBNStats(model)
    try:
        by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for t in tiles:
            by_shape.setdefault(tuple(t.shape), []).append(t)
        for group in by_shape.values():
            for i in range(0, len(group), batch_size):
                model(torch.stack(group[i : i + batch_size]))
        pooled.write()
    finally:
        pooled.remove()
        model.eval()
    for (mean, var), (src_mean, src_var) in zip(_stats(layers), source, strict=True):
        mean.copy_((1 - weight) * src_mean + weight * mean)
        var.copy_((1 - weight) * src_var + weight * var)


def _stats(layers: Sequence[nn.BatchNorm2d]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (running mean, running var) buffers of the layers that track statistics."""
    return [
        (bn.running_mean, bn.running_var) for bn in layers if bn.running_mean is not None and bn.running_var is not None
    ]


def l2sp_distance(model: nn.Module, anchor: nn.Module) -> torch.Tensor:
    """Squared L2 distance between the trainable parameters of ``model`` and the same ones of ``anchor``."""
    ref = dict(anchor.named_parameters())
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.requires_grad:
            total = total + (p - ref[name].detach().to(p.device)).pow(2).sum()
    return total


def few_shot_adapt(
    source: SegmentationModel,
    images: Sequence[Array],
    masks: Sequence[Array],
    unlabelled: torch.Tensor | Sequence[torch.Tensor] | None,
    config: FewShotConfig,
    seed: int = 0,
    device: str = "cpu",
) -> SegmentationModel:
    """Fine-tune a copy of ``source`` on labelled tiles, anchored to the source weights (L2-SP).

    Args:
        source: The source model (left untouched).
        images: Labelled tiles, (C, H, W) uint8 each.
        masks: Their (H, W) class masks (``IGNORE_INDEX`` ignored).
        unlabelled: More target tiles for the BatchNorm statistics ((N, C, H, W), or (C, H, W) tiles of any
            sizes), or None.
        config: Steps, learning rate, crops, anchor weight, weight of the target statistics.
        seed: Seeds crops and initial order (the folds and the shipped model use the same seed).
        device: Where to train.

    Returns:
        The fine-tuned model, in eval mode, on CPU.

    Raises:
        ValueError: No labelled tile, or images and masks of different counts.

    """
    if not images or len(images) != len(masks):
        raise ValueError(f"need labelled tiles with one mask each, got {len(images)} images, {len(masks)} masks")
    dev = select_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    anchor = copy.deepcopy(source).to(dev).eval()
    model = copy.deepcopy(source).to(dev).eval()
    target = [torch.from_numpy(np.asarray(im)).float().to(dev) for im in images]
    if unlabelled is not None:
        target += [t.float().to(dev) for t in unlabelled]
    reestimate_bn(model, target, config.unlabelled_weight)
    model.train()
    for bn in bn_layers(model):
        bn.eval()  # keep the statistics just estimated on every target pixel; a few crops would only add noise
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    for _ in range(config.steps):
        x, y = _crops(images, masks, config.batch_size, config.crop, rng)
        loss = F.cross_entropy(model(x.to(dev)), y.to(dev), ignore_index=IGNORE_INDEX)
        if config.l2sp > 0:
            loss = loss + config.l2sp * l2sp_distance(model, anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model.cpu().eval()


# -- the job ------------------------------------------------------------------------------------------------------
def fold_of(count: int, max_folds: int) -> list[int]:
    """The fold that holds out each of ``count`` labelled tiles: one each up to ``max_folds``, round-robin beyond.

    Round-robin over arrival order spreads every fold over the whole labelling period.
    """
    folds = min(count, max_folds)
    return [j % folds for j in range(count)]


def labelled_mix(tiles: Sequence[BufferedTile], num_classes: int) -> tuple[float, ...] | None:
    """The region's class mix measured on its labelled tiles (None without a labelled pixel)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for t in tiles:
        if t.mask is not None:
            m = t.mask.ravel().astype(np.int64)
            counts += np.bincount(m[m < num_classes], minlength=num_classes)[:num_classes]
    return tuple(float(v) for v in counts / counts.sum()) if counts.sum() > 0 else None


def few_shot_context(
    job: AdaptationJob, labelled: Sequence[BufferedTile], source_manifest: ModelManifest
) -> GateContext:
    """The gate context a few-shot version is rolled out with: the *measured* class mix as the reference.

    A deployer's shadow check (TorchServe) judges label-free; the labels give the region's class mix directly,
    a better reference than a BBSE estimate, so a version that moves predictions toward it is a repair.
    """
    prior = source_manifest.class_prior or None
    return GateContext(
        label_shift=labelled_mix(labelled, len(source_manifest.classes)),
        prior=prior,
        covariate=job.trigger.covariate,
    )


def few_shot_job(
    region: str, acquisition_id: str, count: int, base_version: int, labels: tuple[str, ...], config: FewShotConfig
) -> AdaptationJob:
    """The few-shot job a region's ``count``-th kept label makes (its trigger records the label count).

    The job id derives from the label's acquisition, so a replayed label re-emits the same job (idempotent).
    """
    trigger = DriftEvent(
        region=region,
        acquisition_id=acquisition_id,
        tiles_seen=count,
        signal="labels",
        score=float(count),
        threshold=float(config.min_labels),
    )
    return AdaptationJob(
        job_id=f"few-shot-{acquisition_id}",
        region=region,
        base_version=base_version,
        method=METHOD,
        tile_ids=(),
        trigger=trigger,
        labels=labels,
    )


def rollout_tiles(unlabelled: Sequence[BufferedTile], labelled: Sequence[BufferedTile]) -> list[BufferedTile]:
    """What a deployer may check a few-shot version on: every image, no mask.

    Labels never evaluate a version they trained, and a deployer's shadow check scores masks when it has them.
    """
    return [*unlabelled, *(replace(t, mask=None) for t in labelled)]


@torch.no_grad()
def _confusion(model: SegmentationModel, tiles: Sequence[BufferedTile], device: torch.device) -> npt.NDArray[np.int64]:
    k = model.config.num_classes
    cm = np.zeros((k, k), dtype=np.int64)
    model = model.to(device).eval()
    for t in tiles:
        if t.mask is None:
            continue
        pred = model(torch.from_numpy(t.image[None]).float().to(device)).argmax(dim=1)[0].cpu().numpy()
        cm += confusion_matrix(pred, t.mask, k, IGNORE_INDEX)
    return cm


def _images(tiles: Sequence[BufferedTile]) -> list[torch.Tensor]:
    return [torch.from_numpy(t.image).float() for t in tiles]


def run_few_shot(
    job: AdaptationJob,
    source: SegmentationModel,
    source_manifest: ModelManifest,
    labelled: Sequence[BufferedTile],
    unlabelled: Sequence[BufferedTile],
    config: FewShotConfig,
    *,
    current: SegmentationModel | None = None,
    current_labels: Collection[str] = (),
    device: str = "auto",
) -> AdaptationOutcome:
    """The version a few-shot job makes: the procedure judged on held-out folds, shipped trained on every label.

    For each fold: fine-tune from ``source`` on the labelled tiles outside the fold (the unlabelled tiles and
    those tiles' images feed the BatchNorm statistics; nothing of the held-out tiles does), then score the fold's
    candidate and ``current`` on the held-out tiles. Accepted when the pooled held-out mIoU of the candidates is
    not below the current model's by more than ``config.max_miou_drop``. The shipped model is fine-tuned on all
    labelled tiles; the evaluation was of the procedure, so no label scores the model it trained.

    Args:
        job: The job (region, base version, id: seeds the fine-tunes).
        source: The source model (every version starts from it).
        source_manifest: Its manifest (lineage, class prior).
        labelled: The region's labelled tiles (``mask`` set), in arrival order.
        unlabelled: The job's unlabelled tiles (may be empty).
        config: The few-shot settings.
        current: The model the region serves now; ``None`` = the source.
        current_labels: Labels ``current`` trained on (its ``labels_used``): never scored against it.
        device: Where to train and evaluate.

    Returns:
        The candidate (weights, manifest with ``labels_used`` and the fold scores), its gate result and the gate
        context a deployer must judge it with.

    Raises:
        TooFewLabelsError: Fewer than two labelled tiles: nothing could be held out.

    """
    from adapters.policy import AdaptationOutcome  # runtime import: adapters.policy -> config -> this module

    labelled = [t for t in labelled if t.mask is not None]
    if len(labelled) < 2:
        raise TooFewLabelsError(
            f"job {job.job_id}: {len(labelled)} readable labelled tile(s); a held-out evaluation needs at least 2"
        )
    dev = select_device(device)
    seed = zlib.crc32(job.job_id.encode())
    reference = (source if current is None else current).to(dev).eval()
    k = source.config.num_classes
    cand_cm, cur_cm = np.zeros((k, k), np.int64), np.zeros((k, k), np.int64)
    metrics: dict[str, float] = {"labels": float(len(labelled)), "unlabelled_tiles": float(len(unlabelled))}
    assignment = fold_of(len(labelled), config.max_folds)
    scored = 0
    for fold in range(max(assignment) + 1):
        held = [t for t, f in zip(labelled, assignment, strict=True) if f == fold]
        held = [t for t in held if t.acquisition_id not in current_labels]
        if not held:
            continue  # every tile of the fold trained the current version: no fair score for it
        train = [t for t, f in zip(labelled, assignment, strict=True) if f != fold]
        held_ids = {t.acquisition_id for t in held}
        images = [t.image for t in train]
        masks = [t.mask for t in train if t.mask is not None]
        extra = _images([t for t in unlabelled if t.acquisition_id not in held_ids])
        candidate = few_shot_adapt(source, images, masks, extra, config, seed, str(dev))
        f_cand, f_cur = _confusion(candidate, held, dev), _confusion(reference, held, dev)
        cand_cm += f_cand
        cur_cm += f_cur
        metrics[f"fold{fold}_miou_candidate"] = miou(f_cand)
        metrics[f"fold{fold}_miou_current"] = miou(f_cur)
        metrics[f"fold{fold}_train_tiles"] = float(len(train))
        for t in held:
            metrics[f"heldout_fold:{t.acquisition_id}"] = float(fold)
        scored += 1
    metrics["folds"] = float(scored)
    reasons: list[str] = []
    if scored == 0:
        reasons.append("no held-out label left that the current version did not train on")
    else:
        metrics["miou_candidate"] = miou(cand_cm)
        metrics["miou_current"] = miou(cur_cm)
        if metrics["miou_candidate"] < metrics["miou_current"] - config.max_miou_drop:
            reasons.append(
                f"held-out labelled mIoU drop: {metrics['miou_candidate']:.3f} < {metrics['miou_current']:.3f} "
                f"over {scored} fold(s)"
            )
    result = GateResult(accepted=not reasons, reasons=tuple(reasons), metrics=metrics)
    shipped = few_shot_adapt(
        source,
        [t.image for t in labelled],
        [t.mask for t in labelled if t.mask is not None],
        _images(unlabelled),
        config,
        seed,
        str(dev),
    )
    manifest = source_manifest.model_copy(
        update={
            "region": job.region,
            "parent": job.base_version,
            "method": METHOD,
            "gate_accepted": result.accepted,
            "gate_reasons": result.reasons,
            "gate_metrics": result.metrics,
            "data_window": tuple(t.acquisition_id for t in unlabelled),
            "labels_used": tuple(t.acquisition_id for t in labelled),
            "job_id": job.job_id,
            "metrics": {},
        }
    )
    weights, manifest_json = encode(shipped, manifest)
    context = few_shot_context(job, labelled, source_manifest)
    return AdaptationOutcome(shipped, weights, ModelManifest.model_validate_json(manifest_json), result, context)
