"""Parcel classifier: Pixel-Set Encoder + Lightweight Temporal Attention Encoder (Sainte Fare Garnot et al. 2020).

* The **Pixel-Set Encoder** (PSE) embeds the unordered set of a parcel's pixels on one date: a shared MLP per pixel,
  then mean and standard deviation pooled over the set, then a second MLP. It never needs the parcel's outline on
  a grid, which is why it fits parcels of any shape and size (a BreizhCrops parcel mean is a set of one pixel).
  The original's geometric side features (area, perimeter) are left out: the layouts read here do not carry them.
* The **L-TAE** attends over the dates: each head has one learned *master query* (no per-date query), keys come
  from the date embeddings plus a sinusoidal encoding of the **day of year**, so acquisition calendars of any
  length and spacing are handled, and masked (cloudy, padded) dates get no attention.
* A small MLP decodes the class logits.

The model interface mirrors :class:`terradapt.model.SegmentationModel` where it can: ``forward`` (logits),
``forward_features`` (logits, pooled feature), ``norm_layers``, ``classifier``, ``encoder_modules``,
``set_normalisation`` and ``config.in_channels`` / ``config.num_classes``. The input differs (a
:class:`CropBatch` of reflectance, days of year and a date mask, not an image), so it is its own interface.

``date_offset`` (days added to every day of year before the positional encoding) is a *persistent* buffer: it is
how a phenology-shift adaptation (:mod:`adapters.crops.phenology`) undoes a later or earlier season, and the
adapted value is part of the stored weights. The input normalisation is data kept in the manifest, as for the
segmentation models.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from terradapt.model import ArchConfig

__all__ = ["CROP_ARCHITECTURES", "CROP_NORM_TYPES", "CropBatch", "CropModel", "PseLtae", "PseLtaeConfig"]

#: the layers whose affine parameters entropy methods train on a crop model
CROP_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class CropBatch:
    """Model input: ``x`` (N, T, C, S) reflectance, ``doy`` (N, T) day of year, ``mask`` (N, T) True = use date."""

    x: torch.Tensor
    doy: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> CropBatch:
        """The batch on ``device``."""
        return CropBatch(self.x.to(device), self.doy.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, index: torch.Tensor | slice) -> CropBatch:
        """The parcels ``index`` selects."""
        return CropBatch(self.x[index], self.doy[index], self.mask[index])


@dataclass(frozen=True)
class PseLtaeConfig(ArchConfig):
    """PSE + L-TAE hyper-parameters (demo size by default; the paper's are about 4 x wider)."""

    in_channels: int = 10
    num_classes: int = 6
    pse_hidden: int = 32
    pse_dim: int = 64
    d_model: int = 64
    n_head: int = 4
    d_k: int = 8
    temporal_dim: int = 64
    period: int = 1000


class _BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm that normalises with its running statistics when a training batch holds one row.

    Adapting on a stream of single parcels must not fail on the decoder's BatchNorm; same parameters and buffers
    as ``nn.BatchNorm1d``, so weights are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1 and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _PixelSetEncoder(nn.Module):
    def __init__(self, c: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.mlp1 = nn.Sequential(
            nn.Linear(c, hidden), _BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim), _BatchNorm1d(dim), nn.ReLU()
        )
        self.mlp2 = nn.Sequential(nn.Linear(2 * dim, dim), _BatchNorm1d(dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S) pixel sets -> (B, dim)."""
        b, c, s = x.shape
        h = self.mlp1(x.transpose(1, 2).reshape(b * s, c)).view(b, s, -1)
        pooled = torch.cat([h.mean(dim=1), h.std(dim=1, unbiased=False)], dim=1)
        out: torch.Tensor = self.mlp2(pooled)
        return out


class _LightTemporalAttention(nn.Module):
    def __init__(self, d_in: int, d_model: int, n_head: int, d_k: int, dim: int, period: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
        self.n_head, self.d_k, self.d_model, self.period = n_head, d_k, d_model, period
        self.in_norm = nn.LayerNorm(d_in)
        self.inproj = nn.Linear(d_in, d_model)
        self.query = nn.Parameter(torch.randn(n_head, d_k) * (1.0 / math.sqrt(d_k)))
        self.key = nn.Linear(d_model, n_head * d_k)
        self.mlp = nn.Sequential(nn.Linear(d_model, dim), _BatchNorm1d(dim), nn.ReLU())
        self.out_norm = nn.LayerNorm(dim)

    def positions(self, doy: torch.Tensor) -> torch.Tensor:
        """Sinusoidal encoding (N, T, d_model) of days of year."""
        half = self.d_model // 2
        freq = torch.pow(float(self.period), -torch.arange(half, device=doy.device, dtype=torch.float32) / half)
        angle = doy.float().unsqueeze(-1) * freq
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    def forward(self, h: torch.Tensor, doy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, d_in), (N, T), (N, T) -> ((N, dim), attention (N, heads, T))."""
        n, t, _ = h.shape
        e = self.inproj(self.in_norm(h)) + self.positions(doy)
        keys = self.key(e).view(n, t, self.n_head, self.d_k)
        scores = torch.einsum("nthd,hd->nht", keys, self.query) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        attention = scores.softmax(dim=-1)
        values = e.view(n, t, self.n_head, self.d_model // self.n_head)
        out = torch.einsum("nht,nthd->nhd", attention, values).reshape(n, self.d_model)
        pooled: torch.Tensor = self.out_norm(self.mlp(out))
        return pooled, attention


class CropModel(nn.Module):
    """The interface every crop-stage uses: CropBatch in, logits (N, K) out, plus the pooled temporal feature."""

    architecture: ClassVar[str]
    #: name of the submodule that embeds one date (calendar-free: it never sees the day of year)
    date_encoder: ClassVar[str]
    config: PseLtaeConfig
    input_mean: torch.Tensor
    input_std: torch.Tensor
    date_offset: torch.Tensor

    def __init__(self, config: PseLtaeConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        self.register_buffer("input_mean", torch.full((c,), 0.2), persistent=False)
        self.register_buffer("input_std", torch.full((c,), 0.1), persistent=False)
        self.register_buffer("date_offset", torch.zeros(()), persistent=True)

    def set_normalisation(self, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]) -> None:
        """Set the per-band input normalisation (reflectance units)."""
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-4))

    def set_date_offset(self, days: float) -> None:
        """Days added to every day of year the temporal encoder sees (undoes a phenology shift of -days)."""
        self.date_offset.fill_(float(days))

    def norm_layers(self) -> list[nn.Module]:
        """Normalisation layers (BatchNorm1d, LayerNorm, GroupNorm), in definition order."""
        return [m for m in self.modules() if isinstance(m, CROP_NORM_TYPES)]

    def batchnorm_layers(self) -> list[nn.BatchNorm1d]:
        """The BatchNorm layers (what statistics re-estimation turns)."""
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm1d)]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, C, S) reflectance -> normalised."""
        return (x - self.input_mean.view(1, 1, -1, 1)) / self.input_std.view(1, 1, -1, 1)

    def forward(self, batch: CropBatch) -> torch.Tensor:
        """Logits (N, K)."""
        return self.forward_features(batch)[0]

    def forward_features(self, batch: CropBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K), pooled temporal feature (N, feature_dim))."""
        return self.classify_dates(self.embed_dates(batch), batch)

    @abstractmethod
    def embed_dates(self, batch: CropBatch) -> torch.Tensor:
        """Per-date embeddings (N, T, D), independent of the calendar (a date-shift search computes them once)."""

    @abstractmethod
    def classify_dates(self, embeddings: torch.Tensor, batch: CropBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled feature) from per-date embeddings, the days of year (+ ``date_offset``) and the mask."""

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """Width of the pooled feature."""

    @abstractmethod
    def classifier(self) -> nn.Linear:
        """The last linear layer (its bias adds a constant per class: prior correction)."""

    @abstractmethod
    def encoder_modules(self) -> list[nn.Module]:
        """The encoder part (everything before the decoder)."""


class PseLtae(CropModel):
    """PSE + L-TAE + MLP decoder; BatchNorm in the PSE and decoder, LayerNorm around the attention."""

    architecture = "pse-ltae"
    date_encoder = "pse"

    def __init__(self, config: PseLtaeConfig) -> None:
        super().__init__(config)
        self.pse = _PixelSetEncoder(config.in_channels, config.pse_hidden, config.pse_dim)
        self.ltae = _LightTemporalAttention(
            config.pse_dim, config.d_model, config.n_head, config.d_k, config.temporal_dim, config.period
        )
        self.decoder = nn.Sequential(
            nn.Linear(config.temporal_dim, 32), _BatchNorm1d(32), nn.ReLU(), nn.Linear(32, config.num_classes)
        )

    def embed_dates(self, batch: CropBatch) -> torch.Tensor:
        # only the dates the attention may use go through the PSE: masked (cloudy, padded) dates neither cost
        # compute nor enter the BatchNorm statistics; their embedding is zero and gets no attention
        x = self.normalise(batch.x)
        n, t, c, s = x.shape
        keep = batch.mask.reshape(n * t)
        embedded: torch.Tensor = self.pse(x.reshape(n * t, c, s)[keep])
        per_date = embedded.new_zeros((n * t, embedded.shape[1]))
        per_date[keep] = embedded
        return per_date.view(n, t, -1)

    def classify_dates(self, embeddings: torch.Tensor, batch: CropBatch) -> tuple[torch.Tensor, torch.Tensor]:
        feature, _ = self.ltae(embeddings, batch.doy + self.date_offset, batch.mask)
        logits: torch.Tensor = self.decoder(feature)
        return logits, feature

    def attention(self, batch: CropBatch) -> torch.Tensor:
        """Attention of every head over the dates (N, heads, T): which dates the model looks at."""
        attention: torch.Tensor = self.ltae(self.embed_dates(batch), batch.doy + self.date_offset, batch.mask)[1]
        return attention

    @property
    def feature_dim(self) -> int:
        return self.config.temporal_dim

    def classifier(self) -> nn.Linear:
        last = self.decoder[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError("the decoder must end with a Linear layer")
        return last

    def encoder_modules(self) -> list[nn.Module]:
        return [self.pse, self.ltae]


#: manifest ``architecture`` -> model class (the crop models; segmentation ones are in terradapt.architectures)
CROP_ARCHITECTURES: dict[str, type[CropModel]] = {PseLtae.architecture: PseLtae}
