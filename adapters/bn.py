"""BatchNorm statistics re-estimation (AdaBN) with a source prior.

Why: covariate shift (gain, haze, illumination) moves the activation statistics that BatchNorm normalises with;
recomputing them on target tiles re-centres every layer without touching a single learned weight. With few
target pixels the estimate is noisy, so the source statistics act as a prior worth ``prior_tiles`` tiles:
``stat = (prior * source + n * target) / (prior + n)``. Caveat (shared/FINDINGS.md): the statistics also carry
the class mix, so under pure label shift this pulls predictions toward the source proportions; the monitor
and the gate decide when not to use it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from adapters.base import Adapter, AdapterConfig
from terradapt.model import SegmentationModel, bn_layers


class BNAdaptConfig(AdapterConfig):
    """Config of BatchNorm re-estimation."""

    prior_tiles: float = Field(default=4.0, ge=0.0, description="weight of the source statistics, in tiles")


class BNAdapt(Adapter):
    """Re-estimate BatchNorm running mean/var on target tiles, blended with the source statistics."""

    name = "bn"
    needs_batchnorm = True
    config_class = BNAdaptConfig
    config: BNAdaptConfig

    def configure(self, model: SegmentationModel) -> None:
        model.eval()
        self._seen = 0
        self._sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def changed_names(self) -> set[str]:
        names = set()
        for mod_name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                names |= {
                    f"{mod_name}.running_mean",
                    f"{mod_name}.running_var",
                    f"{mod_name}.num_batches_tracked",
                }
        return names

    @torch.no_grad()
    def adapt_step(self, batch: torch.Tensor) -> None:
        layers = bn_layers(self.model)
        source = {i: (self.source_state_for(i)) for i in range(len(layers))}
        # cumulative average over all tiles seen: momentum=None, computed in train mode on this batch
        for bn in layers:
            bn.train()
            bn.momentum = None
            bn.reset_running_stats()
        self.model(batch)
        n = batch.shape[0]
        for i, bn in enumerate(layers):
            mean, var = bn.running_mean, bn.running_var
            if mean is None or var is None:
                continue
            prev_mean, prev_var = self._sums.get(i, (torch.zeros_like(mean), torch.zeros_like(var)))
            tot_mean = (prev_mean * self._seen + mean * n) / (self._seen + n)
            tot_var = (prev_var * self._seen + var * n) / (self._seen + n)
            self._sums[i] = (tot_mean, tot_var)
            w = self.config.prior_tiles
            total = self._seen + n
            src_mean, src_var = source[i]
            mean.copy_((w * src_mean + total * tot_mean) / (w + total))
            var.copy_((w * src_var + total * tot_var) / (w + total))
            bn.eval()
        self._seen += n

    def source_state_for(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source running (mean, var) of the ``index``-th BatchNorm layer."""
        names = [n for n, m in self.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        dev = next(self.model.parameters()).device
        return (
            self.source_state[f"{names[index]}.running_mean"].to(dev),
            self.source_state[f"{names[index]}.running_var"].to(dev),
        )
