"""Series -> model input: pixel sampling, cloud and NaN handling, padding of calendars of different lengths.

Per date, *clear* pixels are those neither flagged cloudy nor holding a NaN. A date without a clear pixel is
masked out of the attention (the model never sees cloud tops as crop); on a date with some, the other pixels take
the mean of the clear ones (PSE pools over the set, so a few filled pixels barely move it). Every parcel gets
``pixels`` pixels: drawn without replacement from larger sets, with replacement from smaller ones (a BreizhCrops
parcel mean is repeated), as the PSE paper samples. Series of different lengths are padded to the longest, the
padding masked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from terradapt.crops.model import CropBatch
from terradapt.crops.series import ParcelSeries

__all__ = ["iter_batches", "to_batch"]


def _clean(series: ParcelSeries) -> tuple[np.ndarray, np.ndarray]:
    """(values with non-clear pixels filled, date mask)."""
    values = series.values.astype(np.float32, copy=True)  # (T, C, S)
    clear = ~series.cloud & ~np.isnan(values).any(axis=1)  # (T, S)
    counts = clear.sum(axis=1)  # (T,)
    safe = np.where(clear[:, None, :], values, 0.0)
    mean = safe.sum(axis=2) / np.maximum(counts, 1)[:, None]  # (T, C)
    filled = np.where(clear[:, None, :], values, mean[:, :, None])
    return np.nan_to_num(filled, nan=0.0), counts > 0


def to_batch(series: Sequence[ParcelSeries], *, pixels: int = 16, seed: int = 0) -> CropBatch:
    """Stack series into one :class:`CropBatch` (seeded pixel sampling: the same call gives the same batch)."""
    if not series:
        raise ValueError("to_batch needs at least one series")
    rng = np.random.default_rng(seed)
    t_max = max(s.num_dates for s in series)
    c = series[0].values.shape[1]
    x = np.zeros((len(series), t_max, c, pixels), dtype=np.float32)
    doy = np.zeros((len(series), t_max), dtype=np.float32)
    mask = np.zeros((len(series), t_max), dtype=bool)
    for i, s in enumerate(series):
        values, valid = _clean(s)
        n = s.num_pixels
        index = rng.choice(n, size=pixels, replace=n < pixels) if n != pixels else np.arange(n)
        t = s.num_dates
        x[i, :t] = values[:, :, index]
        doy[i, :t] = s.day_of_year()
        mask[i, :t] = valid if valid.any() else True  # a parcel cloudy on every date still gets an answer
    return CropBatch(torch.from_numpy(x), torch.from_numpy(doy), torch.from_numpy(mask))


def iter_batches(
    series: Sequence[ParcelSeries], batch_size: int, *, pixels: int = 16, seed: int = 0, shuffle: bool = False
) -> Iterator[tuple[CropBatch, torch.Tensor]]:
    """(batch, labels (N,), -1 = unknown) of ``batch_size`` series (shuffled with ``seed`` when asked)."""
    order = np.random.default_rng(seed).permutation(len(series)) if shuffle else np.arange(len(series))
    for k, start in enumerate(range(0, len(series), batch_size)):
        chunk = [series[int(i)] for i in order[start : start + batch_size]]
        labels = torch.tensor([s.label for s in chunk], dtype=torch.long)
        yield to_batch(chunk, pixels=pixels, seed=seed * 100_003 + k), labels
