"""BatchNorm statistics re-estimation for the crop model (AdaBN), with a source prior.

Why: a sensor gain, a different atmospheric correction or haze moves the per-band reflectance distribution that
the Pixel-Set Encoder's BatchNorm layers normalise; recomputing their statistics on target parcels re-centres
every layer without touching a learned weight. Statistics are taken layer after layer in one train-mode pass, so
each layer sees its inputs already normalised with target statistics (as AdaBN does). The source statistics act as
a prior worth ``prior_parcels`` parcels: ``stat = (prior * source + n * target) / (prior + n)``. A layer that sees
one row in a batch (the decoder, with a batch of one parcel) keeps its statistics for that batch. Caveat: BatchNorm
statistics also carry the class mix and the calendar, so a strong label shift pulls toward source proportions.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from adapters.crops.base import CropAdapter, CropAdapterConfig, batchnorm_names
from terradapt.crops.model import CropBatch, CropModel


class CropBNConfig(CropAdapterConfig):
    """Config of crop BatchNorm re-estimation."""

    prior_parcels: float = Field(default=16.0, ge=0.0, description="weight of the source statistics, in parcels")
    layers: Literal["all", "pixel-set"] = Field(
        default="all",
        description="which BatchNorm layers: all, or only the Pixel-Set Encoder's (per-date spectra: blind to the "
        "calendar and the class mix, which move the later layers' statistics)",
    )


class CropBNAdapt(CropAdapter):
    """Re-estimate BatchNorm1d running mean/var on target parcels, blended with the source statistics."""

    name = "bn"
    config_class = CropBNConfig
    config: CropBNConfig

    def configure(self, model: CropModel) -> None:
        model.eval()
        self._seen_per_layer: dict[str, int] = {}
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def changed_names(self) -> set[str]:
        return {n for n in batchnorm_names(self.model) if n.rsplit(".", 1)[0] in self._layers()}

    def _layers(self) -> dict[str, nn.BatchNorm1d]:
        """The BatchNorm layers this config re-estimates, by name."""
        return {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, nn.BatchNorm1d)
            and (self.config.layers == "all" or name.startswith(f"{self.model.date_encoder}."))
        }

    @torch.no_grad()
    def adapt_step(self, batch: CropBatch) -> None:
        self.update_statistics(batch)

    @torch.no_grad()
    def update_statistics(self, batch: CropBatch) -> None:
        """Blend this batch's statistics into every BatchNorm layer (cumulative over the batches seen)."""
        layers = self._layers()
        current = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}  # type: ignore[union-attr]
        rows: dict[str, int] = {}
        hooks = [
            m.register_forward_pre_hook(lambda _m, inp, name=name: rows.__setitem__(name, int(inp[0].shape[0])))
            for name, m in layers.items()
        ]
        for m in layers.values():
            m.train()
            m.momentum = None
            m.reset_running_stats()
        try:
            self.model(batch)
        finally:
            for hook in hooks:
                hook.remove()
        n, w = len(batch), self.config.prior_parcels
        for name, m in layers.items():
            mean, var = m.running_mean, m.running_var
            m.eval()
            m.momentum = 0.1
            if mean is None or var is None:
                continue
            if rows.get(name, 0) < 2:  # one row (or none): no batch statistics; keep what the layer had
                mean.copy_(current[name][0])
                var.copy_(current[name][1])
                continue
            prev_mean, prev_var = self._sums.get(name, (torch.zeros_like(mean), torch.zeros_like(var)))
            seen = self._seen_per_layer.get(name, 0)
            tot_mean = (prev_mean * seen + mean * n) / (seen + n)
            tot_var = (prev_var * seen + var * n) / (seen + n)
            self._sums[name] = (tot_mean, tot_var)
            self._seen_per_layer[name] = seen + n
            src_mean = self.source_state[f"{name}.running_mean"].to(mean.device)
            src_var = self.source_state[f"{name}.running_var"].to(var.device)
            total = seen + n
            mean.copy_((w * src_mean + total * tot_mean) / (w + total))
            var.copy_((w * src_var + total * tot_var) / (w + total))

    def extra_state(self) -> dict[str, Any]:
        return {
            "seen": dict(self._seen_per_layer),
            "sums": {k: (m.clone(), v.clone()) for k, (m, v) in self._sums.items()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._seen_per_layer = dict(state["seen"])
        self._sums = {k: (m.clone(), v.clone()) for k, (m, v) in state["sums"].items()}
