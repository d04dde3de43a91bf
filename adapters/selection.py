"""Label-free model selection: estimate, without labels, whether a candidate beats the current model on a region.

The gate must tell a repair from damage when covariate and label shift come together, which is what new
departements look like. Heuristics on the class mix could not (shared/FINDINGS.md: repairs refused, damage
shipped), so the gate asks a calibrated estimator instead:

* **features** of the two versions' outputs on the job's tiles, computable from what any predictor returns
  (class maps, mean confidence and entropy per tile), so the TorchServe shadow check computes them from served
  outputs: the change of mean confidence (difference of confidences, DoC, Guillory et al. 2021), of mean
  entropy, the disagreement between the versions, whether the candidate's class mix moves toward the region's
  label-shift estimate (BBSE) and toward the source prior, and the current model's own confidence (a confident
  current model is in distribution: little to repair);
* an **estimator** of the mIoU change from those features, one ridge regression per adaptation method, fitted
  on *labelled held-out source tiles under synthetic shifts* (``adapters.selection_calibration``): radiometric
  shifts crossed with real class-mix changes (each source area on its own, and class-tilted draws), each
  adapted with the method, the true mIoU change measured with the labels. The calibration stores those
  domains as *data* (``CalibrationData.selection``); every process fits the estimator from them with its own
  settings (``SelectionConfig``), so a changed ridge or margin takes effect without recalibrating;
* a **margin**: the candidate ships only when its estimate exceeds a quantile (``margin_quantile``) of the
  estimator's over-estimates on the calibration domains, so a candidate that looks like the damaging ones does
  not ship. Measured on the tuning set (docs/benchmarks.md, "selection"): the estimator alone is far from
  exact (mean absolute error ~6 mIoU points): the margin is what makes it safe, at a cost in repairs missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field

from terradapt.metrics import pixel_entropy, total_variation
from terradapt.model import SegmentationModel
from terradapt.settings import StrictModel

FEATURES = (
    "confidence_gain",
    "entropy_gain",
    "disagreement",
    "toward_reference",
    "toward_prior",
    "current_confidence",
)


@dataclass(frozen=True)
class VersionOutputs:
    """What one version predicted on the job's tiles: class maps and per-tile mean confidence and entropy."""

    maps: Sequence[npt.NDArray[np.integer]]
    confidence: Sequence[float]
    entropy: Sequence[float]


def class_shares(maps: Sequence[npt.NDArray[np.integer]], k: int) -> npt.NDArray[np.float64]:
    """Pixel share of every class over a set of class maps."""
    flat = np.concatenate([np.asarray(m).ravel() for m in maps]).astype(np.int64)
    return np.bincount(np.clip(flat, 0, k - 1), minlength=k)[:k] / max(flat.size, 1)


def selection_features(
    candidate: VersionOutputs,
    current: VersionOutputs,
    num_classes: int,
    reference: Sequence[float] | None,
    prior: Sequence[float] | None,
) -> dict[str, float]:
    """The estimator's inputs for a candidate against the current version on the same tiles."""
    if not candidate.maps or len(candidate.maps) != len(current.maps):
        raise ValueError(f"need the same non-zero number of maps, got {len(candidate.maps)} and {len(current.maps)}")
    cand, cur = class_shares(candidate.maps, num_classes), class_shares(current.maps, num_classes)
    pairs = zip(candidate.maps, current.maps, strict=True)
    agree = np.mean(np.concatenate([(np.asarray(a) == np.asarray(b)).ravel() for a, b in pairs]))
    uniform = np.full(num_classes, 1.0 / num_classes)
    src = np.asarray(prior, dtype=np.float64) if prior is not None and len(prior) == num_classes else uniform
    ref = np.asarray(reference, dtype=np.float64) if reference is not None and len(reference) == num_classes else src
    return {
        "confidence_gain": float(np.mean(candidate.confidence) - np.mean(current.confidence)),
        "entropy_gain": float(np.mean(candidate.entropy) - np.mean(current.entropy)),
        "disagreement": float(1.0 - agree),
        "toward_reference": total_variation(cur, ref) - total_variation(cand, ref),
        "toward_prior": total_variation(cur, src) - total_variation(cand, src),
        "current_confidence": float(np.mean(current.confidence)),
    }


@torch.no_grad()
def version_outputs(model: SegmentationModel, tiles: torch.Tensor, batch: int = 4) -> VersionOutputs:
    """Class maps, mean confidence and mean entropy per tile of a model (eval mode)."""
    model.eval()
    maps: list[npt.NDArray[np.integer]] = []
    conf: list[float] = []
    ent: list[float] = []
    for i in range(0, tiles.shape[0], batch):
        logits = model(tiles[i : i + batch])
        maps.extend(logits.argmax(dim=1).cpu().numpy())
        conf.extend(logits.softmax(dim=1).max(dim=1).values.mean(dim=(1, 2)).cpu().tolist())
        ent.extend(pixel_entropy(logits).mean(dim=(1, 2)).cpu().tolist())
    return VersionOutputs(maps, conf, ent)


class SelectionDomain(BaseModel):
    """One labelled calibration domain: a method's candidate on shifted source tiles, its features, true gain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shift: str
    subset: str
    method: str
    features: dict[str, float]
    gain: float = Field(description="true mIoU change of the candidate over the source model (fraction)")


class SelectionConfig(StrictModel):
    """How the estimator is fitted and how sure it must be (``adaptation.gate.selection``)."""

    enabled: bool = Field(
        default=True, description="use the estimator (and compute its domains at registry-init / demo calibration)"
    )
    ridge: float = Field(default=30.0, ge=0.0, description="ridge penalty on standardised features")
    margin_quantile: float = Field(
        default=0.75, ge=0.0, le=1.0, description="ship when the estimate exceeds this quantile of over-estimates"
    )
    min_gain: float = Field(default=0.0, description="and exceeds this many mIoU (fraction), whatever the margin")
    min_domains: int = Field(default=8, ge=2, description="fewer calibration domains for a method: pooled fit")
    calibration_tiles_per_domain: int = Field(default=12, ge=2, description="tiles per calibration domain")


@dataclass(frozen=True)
class _Ridge:
    center: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    coef: npt.NDArray[np.float64]
    intercept: float
    margin: float

    def estimate(self, features: dict[str, float]) -> float:
        x = (np.array([features[f] for f in FEATURES]) - self.center) / self.scale
        return float(self.intercept + x @ self.coef)


def _fit(domains: Sequence[SelectionDomain], config: SelectionConfig) -> _Ridge:
    x = np.array([[d.features[f] for f in FEATURES] for d in domains], dtype=np.float64)
    y = np.array([d.gain for d in domains], dtype=np.float64)
    center, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = (x - center) / scale
    intercept = float(y.mean())
    coef = np.linalg.solve(z.T @ z + (config.ridge + 1e-6) * np.eye(z.shape[1]), z.T @ (y - intercept))
    over = (intercept + z @ coef) - y
    margin = max(config.min_gain, float(np.quantile(over, config.margin_quantile)))
    return _Ridge(center, scale, coef, intercept, margin)


@dataclass(frozen=True)
class Estimate:
    """The estimated mIoU change of a candidate (fraction) and the margin it has to clear."""

    gain: float
    margin: float

    @property
    def ships(self) -> bool:
        """Whether the estimate clears the margin."""
        return self.gain > self.margin


class Selector:
    """The fitted estimator: one ridge regression per calibrated method (pooled for methods with few domains)."""

    def __init__(self, domains: Sequence[SelectionDomain], config: SelectionConfig | None = None) -> None:
        """Fit on calibration domains.

        Raises:
            ValueError: fewer than ``config.min_domains`` domains in all.

        """
        self.config = config or SelectionConfig()
        if len(domains) < self.config.min_domains:
            raise ValueError(f"{len(domains)} selection domains; the estimator needs {self.config.min_domains}")
        self.domains = tuple(domains)
        self._pooled = _fit(domains, self.config)
        by_method: dict[str, list[SelectionDomain]] = {}
        for d in domains:
            by_method.setdefault(d.method, []).append(d)
        self._models = {m: _fit(ds, self.config) for m, ds in by_method.items() if len(ds) >= self.config.min_domains}

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, object]], config: SelectionConfig | None = None) -> Selector | None:
        """From stored calibration rows (``CalibrationData.selection``); None when disabled or too few rows."""
        cfg = config or SelectionConfig()
        if not cfg.enabled or len(rows) < cfg.min_domains:
            return None
        return cls([SelectionDomain.model_validate(r) for r in rows], cfg)

    @property
    def methods(self) -> tuple[str, ...]:
        """Methods with an estimator of their own."""
        return tuple(sorted(self._models))

    def estimate(self, method: str, features: dict[str, float]) -> Estimate:
        """The estimated mIoU change of a ``method`` candidate and its margin (pooled fit for other methods)."""
        model = self._models.get(method, self._pooled)
        return Estimate(model.estimate(features), model.margin)
