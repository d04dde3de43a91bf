"""Label-free feature statistics of tiles, computed in the same forward pass as the prediction.

What the drift monitor compares with the source domain:

* per-band radiometry (mean, std over valid pixels) - sensor gain, illumination, haze;
* class-conditional radiometry: each pixel minus the source mean of its *predicted* class, per band (mean and
  std of that residual). A different class mix (label shift) leaves it unchanged; a different look of the same
  classes (covariate shift: gain, haze, season, blur) moves it. This is what separates the two without labels;
* pooled bottleneck features - what the network "sees", robust to nuisance the network ignores;
* BatchNorm-layer statistics of the batch against the running (source) statistics - the covariate shift that
  AdaBN/TENT act on;
* predicted class shares, mean entropy and confidence - label shift and loss of confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from terradapt.metrics import entropy_of_log_probs
from terradapt.model import SegmentationModel, bn_layers
from terradapt.records import FeatureStats


@dataclass(frozen=True)
class TileFeatures:
    """Features of one tile (numpy arrays, model-agnostic)."""

    band_mean: npt.NDArray[np.float64]
    band_std: npt.NDArray[np.float64]
    residual_mean: npt.NDArray[np.float64]
    residual_std: npt.NDArray[np.float64]
    deep: npt.NDArray[np.float64]
    bn_mean_shift: float
    bn_var_ratio: float
    class_shares: npt.NDArray[np.float64]
    mean_entropy: float
    mean_confidence: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists for arrays): what calibration data and warm-up state store."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileFeatures:
        """Inverse of ``to_dict``."""
        values: dict[str, Any] = {
            k: (np.asarray(v, dtype=np.float64) if isinstance(v, list) else v) for k, v in d.items()
        }
        return cls(**values)

    def to_record(self, acquisition_id: str, region: str, version: int) -> FeatureStats:
        """The FeatureStats record of a tile (what the features topic carries)."""
        return FeatureStats(
            acquisition_id=acquisition_id,
            region=region,
            model_version=version,
            band_mean=tuple(map(float, self.band_mean)),
            band_std=tuple(map(float, self.band_std)),
            residual_mean=tuple(map(float, self.residual_mean)),
            residual_std=tuple(map(float, self.residual_std)),
            deep_mean=tuple(map(float, self.deep)),
            bn_mean_shift=self.bn_mean_shift,
            bn_var_ratio=self.bn_var_ratio,
            class_shares=tuple(map(float, self.class_shares)),
            mean_entropy=self.mean_entropy,
            mean_confidence=self.mean_confidence,
        )

    @classmethod
    def from_record(cls, r: FeatureStats) -> TileFeatures:
        """Back from the record to numpy features."""
        return cls(
            band_mean=np.asarray(r.band_mean),
            band_std=np.asarray(r.band_std),
            residual_mean=np.asarray(r.residual_mean),
            residual_std=np.asarray(r.residual_std),
            deep=np.asarray(r.deep_mean),
            bn_mean_shift=r.bn_mean_shift,
            bn_var_ratio=r.bn_var_ratio,
            class_shares=np.asarray(r.class_shares),
            mean_entropy=r.mean_entropy,
            mean_confidence=r.mean_confidence,
        )


@dataclass(frozen=True)
class ForwardResult:
    """Logits, predicted classes and features of a batch."""

    logits: torch.Tensor
    classes: torch.Tensor  # (N, H, W) int64: the class of the highest logit per pixel (first one on ties)
    features: list[TileFeatures]


class _BNRecorder:
    """Forward hooks on every BatchNorm layer: per-sample distance of the input statistics to the running ones.

    The statistic per layer is the mean over channels of |mu_batch - mu_run| / sigma_run (mean shift) and of
    |log(var_batch / var_run)| (scale shift); both are averaged over layers. Per sample, so a batch of tiles
    from mixed regions gives each tile its own value.
    """

    def __init__(self, model: nn.Module) -> None:
        self.shift: list[torch.Tensor] = []
        self.ratio: list[torch.Tensor] = []
        self._handles = [bn.register_forward_hook(self._hook) for bn in bn_layers(model)]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        bn = module
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
            return
        x = inputs[0]
        if x[0, 0].numel() < 2:  # image-pooling branches (1 x 1 maps) have no spatial statistics per tile
            return
        mu, var = spatial_mean_var(x, bn.running_mean)
        run_var = bn.running_var.clamp_min(1e-5)
        self.shift.append(((mu - bn.running_mean).abs() / run_var.sqrt()).mean(dim=1))
        self.ratio.append((var.clamp_min(1e-5) / run_var).log().abs().mean(dim=1))

    def close(self) -> tuple[torch.Tensor, torch.Tensor]:
        for h in self._handles:
            h.remove()
        if not self.shift:
            return torch.zeros(0), torch.zeros(0)
        return torch.stack(self.shift).mean(dim=0), torch.stack(self.ratio).mean(dim=0)


def spatial_mean_var(x: torch.Tensor, centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (biased) variance of (N, C, H, W) ``x`` over H and W.

    As the first two moments about ``centre`` (per channel; a value near the mean keeps the difference of moments
    exact enough in float32): on CPU ``Tensor.var`` over two dimensions costs as much as the convolution that made
    ``x``, this costs three element-wise passes.
    """
    d = x if centre is None else x - centre.view(1, -1, 1, 1)
    m1 = d.mean(dim=(2, 3))
    m2 = (d * d).mean(dim=(2, 3))
    mean = m1 if centre is None else m1 + centre.view(1, -1)
    return mean, (m2 - m1 * m1).clamp_min(0.0)


def band_statistics(
    image: npt.NDArray[np.generic],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-band mean and std of a (C, H, W) tile, scaled to [0, 1] for uint8 input."""
    x = image.astype(np.float64).reshape(image.shape[0], -1) / 255.0
    return x.mean(axis=1), x.std(axis=1)


@torch.no_grad()
def forward_with_features(
    model: SegmentationModel, batch: torch.Tensor, images: npt.NDArray[np.generic]
) -> ForwardResult:
    """Run the model once on ``batch`` (N, C, H, W float) and compute every tile's features.

    Args:
        model: the model in eval mode.
        batch: the input tensor on the model's device.
        images: the same tiles as a numpy array (N, C, H, W) for radiometric statistics.

    Returns:
        Logits on the model's device and one TileFeatures per tile.

    """
    recorder = _BNRecorder(model)
    try:
        logits, pooled = model.forward_features(batch)
    finally:
        shift, ratio = recorder.close()
    log_p = logits.log_softmax(dim=1)
    entropy = entropy_of_log_probs(log_p).mean(dim=(1, 2))
    # ``max`` gives the class and the top logit in one pass (``argmax`` over the class dimension is ~5x slower on
    # CPU); the top class's probability is read back from the log-probabilities
    pred = logits.max(dim=1).indices
    confidence = log_p.gather(1, pred.unsqueeze(1)).exp().mean(dim=(1, 2, 3))
    k = logits.shape[1]
    expected = model.class_band_mean[pred].permute(0, 3, 1, 2)
    residual = batch / 255.0 - expected
    mean_r, var_r = spatial_mean_var(residual)
    n = residual.shape[2] * residual.shape[3]
    res_mean = mean_r.double().cpu().numpy()
    res_std = (var_r.double() * (n / max(n - 1, 1))).sqrt().cpu().numpy()  # unbiased, as Tensor.std
    shares = torch.stack([torch.bincount(p.flatten(), minlength=k).float() / p.numel() for p in pred])
    out = []
    for i in range(batch.shape[0]):
        mean, std = band_statistics(images[i])
        out.append(
            TileFeatures(
                band_mean=mean,
                band_std=std,
                residual_mean=res_mean[i],
                residual_std=res_std[i],
                deep=pooled[i].double().cpu().numpy(),
                bn_mean_shift=float(shift[i]) if shift.numel() else 0.0,
                bn_var_ratio=float(ratio[i]) if ratio.numel() else 0.0,
                class_shares=shares[i].double().cpu().numpy(),
                mean_entropy=float(entropy[i]),
                mean_confidence=float(confidence[i]),
            )
        )
    return ForwardResult(logits=logits, classes=pred, features=out)


def average_features(parts: list[TileFeatures], weights: list[float] | None = None) -> TileFeatures:
    """Combine the features of the windows of one large acquisition (weighted by window area)."""
    w = np.asarray(weights if weights is not None else [1.0] * len(parts), dtype=np.float64)
    w = w / w.sum()

    def avg(values: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
        return np.tensordot(w, np.stack(values), axes=1)

    return TileFeatures(
        band_mean=avg([p.band_mean for p in parts]),
        band_std=avg([p.band_std for p in parts]),
        residual_mean=avg([p.residual_mean for p in parts]),
        residual_std=avg([p.residual_std for p in parts]),
        deep=avg([p.deep for p in parts]),
        bn_mean_shift=float(np.dot(w, [p.bn_mean_shift for p in parts])),
        bn_var_ratio=float(np.dot(w, [p.bn_var_ratio for p in parts])),
        class_shares=avg([p.class_shares for p in parts]),
        mean_entropy=float(np.dot(w, [p.mean_entropy for p in parts])),
        mean_confidence=float(np.dot(w, [p.mean_confidence for p in parts])),
    )
