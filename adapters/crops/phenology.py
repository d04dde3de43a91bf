"""Temporal-shift adaptation: estimate a country's phenology offset and undo it (shift estimation as in TimeMatch).

Why: crops green up and ripen weeks later in a northern or colder country, and a temporal encoder that learnt
"wheat peaks around day 150" reads a wheat parcel peaking at day 175 as something else; no amount of
re-normalisation fixes that, because every spectrum is right, only at the wrong date. TimeMatch (Nyborg et al.,
2022) estimates the shift with the source model's predictions on target inputs shifted by candidate offsets, then
trains on the shifted inputs; here the estimate itself is the adaptation: the model's ``date_offset`` (days added to
every day of year before the positional encoding) is set to the best candidate, so no weight changes and the
result is exact to undo. TimeMatch's teacher-student self-training stage is not implemented.

Scoring every candidate is cheap: the per-date embeddings (the Pixel-Set Encoder) do not depend on the calendar,
so they are computed once per batch and only the attention and decoder run per candidate. Label-free criteria:

* ``inception`` (default; TimeMatch's initial estimate): the offset of highest inception score, i.e. mutual
  information between parcel and prediction, ``H(mean p) - mean H(p)``: predictions confident *and* spread over
  classes. Chosen on the tuning country only (docs/benchmarks.md);
* ``entropy``: lowest mean prediction entropy alone: can favour an offset where the model is confidently wrong;
* ``prior_kl``: mean predicted class mix closest (KL) to the source class prior; blind to a real change of crop
  mix.

Scores accumulate over every batch seen (a sum per candidate), so the estimate firms up along the stream and a
state round trip keeps it. ``phenology-bn`` first re-estimates the Pixel-Set Encoder's BatchNorm statistics (per-date
spectra: calendar-free, so they cannot depend on the offset being estimated), then scores the offsets on that
re-normalised model: a sensor-gain change would otherwise make every candidate look wrong.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from adapters.crops.base import CropAdapter, CropAdapterConfig
from adapters.crops.norm import CropBNAdapt, CropBNConfig
from terradapt.crops.model import CropBatch, CropModel
from terradapt.metrics import entropy_of_log_probs


class PhenologyConfig(CropAdapterConfig):
    """Config of the phenology-shift estimate: the candidate offsets (days) and the criterion."""

    min_days: int = Field(default=-60, ge=-180, le=0)
    max_days: int = Field(default=60, ge=0, le=180)
    step_days: int = Field(default=2, ge=1, le=30)
    criterion: Literal["inception", "entropy", "prior_kl"] = "inception"
    min_parcels: int = Field(default=8, ge=1, description="parcels seen before the offset moves from the source's")

    @model_validator(mode="after")
    def _grid(self) -> PhenologyConfig:
        if self.max_days - self.min_days < self.step_days:
            raise ValueError(f"min_days={self.min_days}..max_days={self.max_days} holds fewer than two candidates")
        return self


class ShiftEstimator:
    """Accumulates, per candidate offset, the scores of the label-free criterion over the batches seen."""

    def __init__(self, config: PhenologyConfig, num_classes: int, base_offset: float) -> None:
        self.config = config
        self.base_offset = base_offset
        self.candidates = torch.arange(config.min_days, config.max_days + 1, config.step_days, dtype=torch.float32)
        self.entropy_sum = torch.zeros(len(self.candidates), dtype=torch.float64)
        self.prob_sum = torch.zeros(len(self.candidates), num_classes, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, model: CropModel, batch: CropBatch) -> None:
        """Score every candidate offset on ``batch`` (model in eval mode; its offset restored afterwards)."""
        was_training = model.training
        model.eval()
        offset = float(model.date_offset)
        embeddings = model.embed_dates(batch)
        try:
            for i, candidate in enumerate(self.candidates.tolist()):
                model.set_date_offset(self.base_offset + candidate)
                log_p = model.classify_dates(embeddings, batch)[0].log_softmax(dim=1)
                self.entropy_sum[i] += float(entropy_of_log_probs(log_p).sum())
                self.prob_sum[i] += log_p.exp().sum(dim=0).double().cpu()
        finally:
            model.set_date_offset(offset)
            model.train(was_training)
        self.count += len(batch)

    def scores(self, class_prior: torch.Tensor) -> torch.Tensor:
        """The criterion per candidate (lower is better)."""
        n = max(self.count, 1)
        if self.config.criterion == "entropy":
            return self.entropy_sum / n
        if self.config.criterion == "inception":  # minus the mutual information H(mean p) - mean H(p)
            mix = (self.prob_sum / n).clamp_min(1e-12)
            return self.entropy_sum / n + (mix * mix.log()).sum(dim=1)
        mix = (self.prob_sum / n).clamp_min(1e-8)
        prior = class_prior.double().clamp_min(1e-8)
        return (mix * (mix / prior).log()).sum(dim=1)

    def best(self, class_prior: torch.Tensor) -> float:
        """The offset to use: the source's until ``min_parcels`` parcels were seen, then the best candidate's."""
        if self.count < self.config.min_parcels:
            return self.base_offset
        return self.base_offset + float(self.candidates[int(self.scores(class_prior).argmin())])

    def state_dict(self) -> dict[str, Any]:
        return {"entropy_sum": self.entropy_sum.clone(), "prob_sum": self.prob_sum.clone(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entropy_sum = state["entropy_sum"].clone()
        self.prob_sum = state["prob_sum"].clone()
        self.count = int(state["count"])


class PhenologyShift(CropAdapter):
    """Set ``date_offset`` to the candidate that best undoes the target's phenology shift (no weight changes)."""

    name = "phenology"
    config_class = PhenologyConfig
    config: PhenologyConfig

    def configure(self, model: CropModel) -> None:
        model.eval()
        self.estimator = ShiftEstimator(self.config, model.config.num_classes, float(model.date_offset))

    def changed_names(self) -> set[str]:
        return {"date_offset"}

    def adapt_step(self, batch: CropBatch) -> None:
        self.estimator.update(self.model, batch)
        self.model.set_date_offset(self.estimator.best(self.class_prior))

    @property
    def offset_days(self) -> float:
        """The estimated offset added to the days of year (the phenology shift is its negative)."""
        return float(self.model.date_offset)

    def extra_state(self) -> dict[str, Any]:
        return self.estimator.state_dict()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state)


class PhenologyBNConfig(PhenologyConfig, CropBNConfig):
    """Config of the phenology offset with Pixel-Set Encoder BatchNorm re-estimation."""

    layers: Literal["all", "pixel-set"] = "pixel-set"

    @model_validator(mode="after")
    def _pixel_set_only(self) -> PhenologyBNConfig:
        if self.layers != "pixel-set":
            raise ValueError(
                "phenology-bn re-estimates the pixel-set layers only (layers='pixel-set'): the later "
                "layers see the calendar, whose offset is being estimated"
            )
        return self


class PhenologyBN(CropBNAdapt):
    """Re-normalise the per-date spectra (Pixel-Set Encoder BatchNorm), then undo the phenology shift."""

    name = "phenology-bn"
    config_class = PhenologyBNConfig
    config: PhenologyBNConfig

    def configure(self, model: CropModel) -> None:
        super().configure(model)
        self.estimator = ShiftEstimator(self.config, model.config.num_classes, float(model.date_offset))

    def changed_names(self) -> set[str]:
        return super().changed_names() | {"date_offset"}

    @torch.no_grad()
    def adapt_step(self, batch: CropBatch) -> None:
        self.update_statistics(batch)
        self.estimator.update(self.model, batch)
        self.model.set_date_offset(self.estimator.best(self.class_prior))

    def extra_state(self) -> dict[str, Any]:
        return {"bn": super().extra_state(), "shift": self.estimator.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state["bn"])
        self.estimator.load_state_dict(state["shift"])
