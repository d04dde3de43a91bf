"""Safety gate: a candidate version is deployed only if it passes label-free checks (and labelled ones if any).

Checks, each with the reason recorded when it fails:

* entropy collapse - the candidate's mean entropy fell far below the current model's: entropy minimisation can
  drive a model to be confidently wrong, typically by predicting one class everywhere;
* class collapse - one class covers almost the whole region while the current model spreads over several;
* class-distribution jump - total variation between the candidate's and the current model's predicted class
  shares exceeds a bound, unless the candidate moved *toward* the reference mix (the label-shift estimate, else
  the source prior): when the current model has collapsed on a shifted region, a large jump is the repair;
* agreement - the candidate disagrees with the current model on too many pixels (waived, like the jump, when
  the candidate's class mix is closer to the reference than the current model's);
* the reference mixes: the region's label-shift estimate (BBSE, ``AdaptationJob.label_shift``) when it is
  within ``broken_tv`` of the source prior (BBSE assumes pure label shift; an estimate that far from the prior
  mostly echoes a source model broken by covariate shift), and the source prior when the current model's mix is
  farther than ``broken_tv`` from it (the current model has collapsed). Moving toward either waives the jump and
  agreement checks; the estimate never rejects on its own: measured on the synthetic departements
  (bench/adaptation.py), rejecting candidates that moved away from it also rejected the repairs of
  covariate-shifted regions, whose source predictions bias it;
* labelled mIoU - when labelled tiles exist, the candidate must not be worse than the current model;
* **label-free selection** (``adapters.selection``) - when the context carries a fitted ``Selector`` (the
  calibration held selection domains), the candidate ships only when its estimated mIoU change clears the
  calibrated margin, and the class-mix jump / agreement heuristics above are *not* applied: measured on the
  tuning set they refused repairs and shipped damage alike, while the estimator is calibrated for exactly that
  decision (``use_heuristics`` brings them back on top). Without a selector (calibration without labels) the
  heuristics decide, as before;
* **degenerate tiles** (``adapters.tile_quality``) - ``Gate.check`` judges on the informative distinct tiles only
  (flat, clipped and byte-duplicated tiles set aside) and refuses when they are too few: label-free checks on
  all-black, saturated or one repeated tile say nothing about the region's real imagery, and measured on the test
  world every method's candidate adapted on such a stream passed the other checks while losing most of the
  region's clean mIoU (tests/stream/test_poisoned_streams.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field

from adapters.selection import SelectionConfig, Selector, VersionOutputs, selection_features
from adapters.tile_quality import TileQualityConfig, screen
from terradapt.classes import IGNORE_INDEX
from terradapt.metrics import confusion_matrix, miou, pixel_entropy, total_variation
from terradapt.model import SegmentationModel
from terradapt.settings import StrictModel


class GateConfig(StrictModel):
    """Thresholds of the safety gate."""

    min_entropy_ratio: float = Field(default=0.35, ge=0.0, le=1.0)
    max_class_share: float = Field(default=0.9, gt=0.0, le=1.0)
    max_class_tv: float = Field(default=0.25, ge=0.0, le=1.0)
    min_agreement: float = Field(default=0.6, ge=0.0, le=1.0)
    max_miou_drop: float = Field(default=0.005, ge=0.0, description="allowed labelled mIoU loss (fraction)")
    broken_tv: float = Field(
        default=0.5, ge=0.0, le=1.0, description="current class mix this far (TV) from the source prior = broken"
    )
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    use_heuristics: bool = Field(
        default=False, description="also apply the class-mix jump / agreement checks when a selector decides"
    )
    tile_quality: TileQualityConfig = Field(default_factory=TileQualityConfig)


@dataclass(frozen=True)
class GateContext:
    """What the gate knows about the region besides the two versions' outputs: one object for every gate.

    The in-process gate (before publication) and the TorchServe shadow check (on served outputs) receive the
    same context for a job, built once from the job and the source manifest.

    Attributes:
        label_shift: The job's BBSE estimate of the region's class mix (``AdaptationJob.label_shift``).
        prior: The source class mix (``ModelManifest.class_prior``).
        covariate: Whether the monitor's evidence is covariate shift (``DriftEvent.covariate``).
        selector: The label-free estimator fitted from the calibration's selection domains (None: heuristics).
        method: The adaptation method of the candidate (the selector has one estimator per method).

    """

    label_shift: tuple[float, ...] | None = None
    prior: tuple[float, ...] | None = None
    covariate: bool = False
    selector: Selector | None = None
    method: str = ""


@dataclass(frozen=True)
class GateResult:
    """Decision of the gate with its reasons and measurements."""

    accepted: bool
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def _predict(
    model: SegmentationModel, tiles: torch.Tensor, batch: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class maps, per-tile mean entropies and mean confidences."""
    model.eval()
    maps, ents, confs = [], [], []
    for i in range(0, tiles.shape[0], batch):
        logits = model(tiles[i : i + batch])
        ents.append(pixel_entropy(logits).mean(dim=(1, 2)))
        confs.append(logits.softmax(dim=1).max(dim=1).values.mean(dim=(1, 2)))
        maps.append(logits.argmax(dim=1))
    return torch.cat(maps), torch.cat(ents), torch.cat(confs)


def judge(
    candidate_maps: Sequence[npt.NDArray[np.integer]],
    candidate_entropy: Sequence[float],
    current_maps: Sequence[npt.NDArray[np.integer]],
    current_entropy: Sequence[float],
    num_classes: int,
    config: GateConfig,
    context: GateContext | None = None,
    masks: Sequence[npt.NDArray[np.uint8] | None] | None = None,
    *,
    candidate_confidence: Sequence[float] | None = None,
    current_confidence: Sequence[float] | None = None,
) -> GateResult:
    """The gate's decision from two versions' class maps and per-tile entropies (and confidences) on the same tiles.

    ``context.label_shift`` (the reference) is a label-shift estimate of the region's class mix (trusted unless
    farther than ``broken_tv`` from ``context.prior``, the source class mix). A big change (class-mix jump, low
    agreement) is accepted as a repair when it moves the predicted mix toward the trusted estimate, or toward the
    source prior *when* the current model's mix is implausibly far from that prior (``broken_tv``: the current
    model has collapsed on a shifted region) or the monitor's evidence is covariate shift (``context.covariate``:
    the class-conditional radiometry moved, so the current predictions, not the class mix, are what changed).
    Moving toward the source prior alone is not enough: under pure label shift that is exactly what BatchNorm
    re-estimation does wrong (shared/FINDINGS.md).

    Shared by ``Gate.check`` (in-process models, before publication) and the TorchServe shadow check (the
    outputs a server actually returns), so both judge with the same rules, thresholds and context.
    """
    ctx = context or GateContext()
    reference, prior, covariate = ctx.label_shift, ctx.prior or None, ctx.covariate
    if not candidate_maps or len(candidate_maps) != len(current_maps):
        raise ValueError(f"need the same non-zero number of maps, got {len(candidate_maps)} and {len(current_maps)}")
    cand_all = np.concatenate([np.asarray(m).ravel() for m in candidate_maps])
    cur_all = np.concatenate([np.asarray(m).ravel() for m in current_maps])
    cand_shares = np.bincount(cand_all, minlength=num_classes)[:num_classes] / cand_all.size
    cur_shares = np.bincount(cur_all, minlength=num_classes)[:num_classes] / cur_all.size
    m: dict[str, float] = {
        "entropy_candidate": float(np.mean(candidate_entropy)),
        "entropy_current": float(np.mean(current_entropy)),
        "agreement": float(np.mean(cand_all == cur_all)),
        "class_tv": total_variation(cand_shares, cur_shares),
        "max_class_share": float(cand_shares.max()),
        "tiles": float(len(candidate_maps)),
    }
    reasons: list[str] = []
    if m["entropy_candidate"] < config.min_entropy_ratio * m["entropy_current"]:
        reasons.append(
            f"entropy collapse: {m['entropy_candidate']:.3f} < {config.min_entropy_ratio} x {m['entropy_current']:.3f}"
        )
    if m["max_class_share"] > config.max_class_share and cur_shares.max() <= config.max_class_share:
        reasons.append(f"class collapse: one class covers {m['max_class_share']:.0%} of pixels")
    toward_reference = False
    trusted = reference is not None and len(reference) == num_classes
    if trusted and prior is not None and len(prior) == num_classes:
        m["tv_reference_to_prior"] = total_variation(np.asarray(reference), np.asarray(prior))
        trusted = m["tv_reference_to_prior"] <= config.broken_tv
    if trusted and reference is not None:
        target = np.asarray(reference, dtype=np.float64)
        m["tv_candidate_to_reference"] = total_variation(cand_shares, target)
        m["tv_current_to_reference"] = total_variation(cur_shares, target)
        toward_reference = m["tv_candidate_to_reference"] < m["tv_current_to_reference"]
    if prior is not None and len(prior) == num_classes:
        source = np.asarray(prior, dtype=np.float64)
        m["tv_candidate_to_prior"] = total_variation(cand_shares, source)
        m["tv_current_to_prior"] = total_variation(cur_shares, source)
        toward_reference = toward_reference or (
            (m["tv_current_to_prior"] > config.broken_tv or covariate)
            and m["tv_candidate_to_prior"] < m["tv_current_to_prior"]
        )
    selector = ctx.selector if candidate_confidence is not None and current_confidence is not None else None
    if selector is not None and candidate_confidence is not None and current_confidence is not None:
        feats = selection_features(
            VersionOutputs(candidate_maps, candidate_confidence, candidate_entropy),
            VersionOutputs(current_maps, current_confidence, current_entropy),
            num_classes,
            reference,
            prior,
        )
        estimate = selector.estimate(ctx.method, feats)
        m |= {f"selection_{k}": v for k, v in feats.items()}
        m["estimated_gain"], m["estimate_margin"] = estimate.gain, estimate.margin
        if not estimate.ships:
            reasons.append(
                f"estimated mIoU change {100 * estimate.gain:+.1f} "
                f"does not clear the margin {100 * estimate.margin:+.1f}"
            )
    # a big change is a repair, not a risk, when it brings the class mix toward the reference mix
    if selector is None or config.use_heuristics:
        if m["class_tv"] > config.max_class_tv and not toward_reference:
            reasons.append(f"class distribution jump: TV {m['class_tv']:.3f} > {config.max_class_tv}")
        if m["agreement"] < config.min_agreement and not toward_reference:
            reasons.append(f"low agreement with current model: {m['agreement']:.2f} < {config.min_agreement}")
    labelled = [i for i, mk in enumerate(masks or []) if mk is not None]
    if labelled and masks is not None:
        truth = np.concatenate([np.asarray(masks[i]).ravel() for i in labelled])
        cand_l = np.concatenate([np.asarray(candidate_maps[i]).ravel() for i in labelled])
        cur_l = np.concatenate([np.asarray(current_maps[i]).ravel() for i in labelled])
        m["miou_candidate"] = miou(confusion_matrix(cand_l, truth, num_classes, IGNORE_INDEX))
        m["miou_current"] = miou(confusion_matrix(cur_l, truth, num_classes, IGNORE_INDEX))
        if m["miou_candidate"] < m["miou_current"] - config.max_miou_drop:
            reasons.append(f"labelled mIoU drop: {m['miou_candidate']:.3f} < {m['miou_current']:.3f}")
    return GateResult(accepted=not reasons, reasons=tuple(reasons), metrics=m)


class Gate:
    """Label-free and labelled checks of a candidate against the current model."""

    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()

    def check(
        self,
        candidate: SegmentationModel,
        current: SegmentationModel,
        tiles: torch.Tensor,
        context: GateContext | None = None,
        masks: Sequence[npt.NDArray[np.uint8] | None] | None = None,
    ) -> GateResult:
        """Compare candidate and current model on the region's recent tiles (N, C, H, W).

        Only the informative distinct tiles are judged (``adapters.tile_quality``); when they are too few, the
        candidate is refused with a ``degenerate tiles`` reason whatever the other checks say.
        """
        screening = screen(list(tiles.detach().cpu().numpy()), self.config.tile_quality)
        if screening.excluded and screening.informative:
            keep = list(screening.informative)
            tiles = tiles[keep]
            masks = None if masks is None else [masks[i] for i in keep]
        cand_maps, cand_ent, cand_conf = _predict(candidate, tiles)
        cur_maps, cur_ent, cur_conf = _predict(current, tiles)
        result = judge(
            list(cand_maps.cpu().numpy()),
            cand_ent.cpu().tolist(),
            list(cur_maps.cpu().numpy()),
            cur_ent.cpu().tolist(),
            candidate.config.num_classes,
            self.config,
            context,
            masks,
            candidate_confidence=cand_conf.cpu().tolist(),
            current_confidence=cur_conf.cpu().tolist(),
        )
        if not self.config.tile_quality.enabled:
            return result
        metrics = result.metrics | screening.metrics()
        metrics["tiles"] = float(screening.total)
        if screening.usable:
            return GateResult(result.accepted, result.reasons, metrics)
        return GateResult(False, (screening.reason(), *result.reasons), metrics)
