"""Safety gate for crop model candidates: label-free checks on recent parcels, and a labelled one when labels exist.

Checks, each with its reason recorded when it fails (the result is the segmentation gate's ``GateResult``):

* ``class_collapse``: one class takes almost every parcel while the current model spreads over several (what
  entropy minimisation does when it goes wrong);
* ``entropy_collapse``: the candidate's mean prediction entropy fell far below the current model's *and* its
  predicted class mix narrowed (the entropy of the argmax class shares fell). Confidence alone is not collapse: a
  repair of a very unsure current model is far more confident while it keeps telling the classes apart (its
  class shares stay as diverse), and ``information_drop`` still refuses a candidate that is confident without
  being informative;
* ``information_drop``: the mutual information between parcels and predictions, ``H(mean p) - mean H(p)`` (the
  inception score's log), fell: a model that fits a region is confident *and* tells its parcels apart. It is the
  quantity the phenology method maximises over offsets, so it must be judged on parcels the candidate was not
  adapted on (the buffer's later parcels, or fresh ones);
* ``accuracy_drop``: with labelled parcels, the candidate's overall accuracy is lower than the current model's by
  more than ``max_accuracy_drop``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from adapters.gate import GateResult
from terradapt.crops.model import CropBatch, CropModel
from terradapt.metrics import entropy_of_log_probs
from terradapt.settings import StrictModel

__all__ = ["CropGate", "CropGateConfig"]


class CropGateConfig(StrictModel):
    """Thresholds of the crop gate."""

    max_class_share: float = Field(default=0.9, gt=0.0, le=1.0)
    min_entropy_ratio: float = Field(default=0.35, ge=0.0, le=1.0)
    min_information_gain: float = Field(
        default=0.0, description="candidate minus current mutual information (nats) must be at least this"
    )
    max_accuracy_drop: float = Field(default=0.005, ge=0.0, description="allowed labelled accuracy loss (fraction)")


@torch.no_grad()
def _outputs(model: CropModel, batches: Sequence[CropBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, K), entropies (N,)) in eval mode."""
    model.eval()
    log_p = torch.cat([model(b).log_softmax(dim=1) for b in batches])
    return log_p.exp(), entropy_of_log_probs(log_p)


def _summary(probs: torch.Tensor, entropy: torch.Tensor) -> dict[str, float]:
    mix = probs.mean(dim=0).clamp_min(1e-12)
    shares = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1]).float() / probs.shape[0]
    nonzero = shares[shares > 0]
    return {
        "entropy": float(entropy.mean()),
        "information": float(-(mix * mix.log()).sum() - entropy.mean()),
        "max_class_share": float(shares.max()),
        "share_entropy": float(-(nonzero * nonzero.log()).sum()),
    }


class CropGate:
    """``check(candidate, current, batches, labels=None) -> GateResult``."""

    def __init__(self, config: CropGateConfig | None = None) -> None:
        self.config = config or CropGateConfig()

    def check(
        self,
        candidate: CropModel,
        current: CropModel,
        batches: Sequence[CropBatch],
        labels: torch.Tensor | None = None,
    ) -> GateResult:
        """Compare the two models on the same parcels; accepted only when no check fails.

        Args:
            candidate: the adapted model.
            current: the model the region serves now.
            batches: recent parcels of the region, ideally not the ones the candidate adapted on.
            labels: class index of every parcel in ``batches`` (-1 = unknown), when some are labelled.

        Raises:
            ValueError: no parcels, or labels of another length than the parcels.

        """
        if not batches or sum(len(b) for b in batches) == 0:
            raise ValueError("the crop gate needs at least one parcel")
        cand_p, cand_h = _outputs(candidate, batches)
        cur_p, cur_h = _outputs(current, batches)
        cand, cur = _summary(cand_p, cand_h), _summary(cur_p, cur_h)
        metrics = {f"candidate_{k}": v for k, v in cand.items()} | {f"current_{k}": v for k, v in cur.items()}
        reasons: list[str] = []
        cfg = self.config
        if cand["max_class_share"] > cfg.max_class_share >= cur["max_class_share"]:
            reasons.append("class_collapse")
        confident = cur["entropy"] > 0 and cand["entropy"] < cfg.min_entropy_ratio * cur["entropy"]
        if confident and cand["share_entropy"] < cur["share_entropy"]:
            reasons.append("entropy_collapse")
        if cand["information"] - cur["information"] < cfg.min_information_gain:
            reasons.append("information_drop")
        if labels is not None:
            if labels.shape[0] != cand_p.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {cand_p.shape[0]} parcels")
            known = labels >= 0
            if bool(known.any()):
                truth = labels[known]
                cand_acc = float((cand_p.argmax(dim=1)[known] == truth).float().mean())
                cur_acc = float((cur_p.argmax(dim=1)[known] == truth).float().mean())
                metrics |= {"candidate_accuracy": cand_acc, "current_accuracy": cur_acc}
                if cand_acc < cur_acc - cfg.max_accuracy_drop:
                    reasons.append("accuracy_drop")
        return GateResult(accepted=not reasons, reasons=tuple(reasons), metrics=metrics)
