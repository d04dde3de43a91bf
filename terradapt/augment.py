"""Strong radiometric augmentation of raw tiles, the source-side half of "train to adapt".

Why: the shifts terradapt meets between departements are mostly radiometric (another camera calibration, haze,
sun, defocus, sensor noise: ``terradapt.datasets.synthetic.DomainFactors``). A source model that has already seen
such variations during training depends less on the exact source radiometry, so it loses less on a new region
and its BatchNorm statistics move less (drift detectors and test-time adapters then start from a better place).

The augmentation acts on the raw 0..255 image, *before* the model's own normalisation: the model keeps the
source normalisation buffers and must learn to cope with gains, offsets and haze the way it will meet them in
the stream. Every transform has a probability and a range (``Range``), and every draw comes from the generator
the caller passes, so the same generator state gives the same pixels. Only the leading optical bands are changed
(``bands``): FLAIR's fifth band is an elevation model, which a camera or the atmosphere cannot change.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from terradapt.errors import InvalidTileError
from terradapt.settings import StrictModel

__all__ = ["RadiometricAugmentConfig", "Range", "radiometric_augment"]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


class Range(StrictModel):
    """One transform: applied with probability ``p``, its strength drawn uniformly in ``[low, high]``."""

    p: float = Field(ge=0.0, le=1.0, description="probability that the transform is applied to a tile")
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low={self.low} > high={self.high}: a range needs low <= high")
        return self

    def draw(self, rng: np.random.Generator) -> float:
        """Draw one strength."""
        return float(rng.uniform(self.low, self.high))

    def draw_bands(self, rng: np.random.Generator, bands: int) -> F32:
        """Draw one strength per band, shaped (bands, 1, 1) to broadcast over a (bands, H, W) image."""
        values: F32 = rng.uniform(self.low, self.high, size=bands).astype(np.float32)
        return values[:, None, None]


class RadiometricAugmentConfig(StrictModel):
    """How strongly tiles are perturbed; the defaults cover the synthetic departements' shifts and more.

    Order of application is physical: haze (atmosphere), blur (optics), gain/offset (sensor calibration), gamma
    (processing chain), noise (sensor), then rounding to uint8.
    """

    haze: Range = Field(
        default=Range(p=0.3, low=0.0, high=0.4),
        description="blend weight toward a bright airlight (contrast loss + added path radiance)",
    )
    airlight: tuple[float, float] = Field(
        default=(180.0, 250.0), description="range of the airlight's digital number, drawn per band"
    )
    blur: Range = Field(default=Range(p=0.2, low=0.3, high=1.5), description="gaussian blur sigma, pixels")
    gain: Range = Field(default=Range(p=0.8, low=0.8, high=1.2), description="per-band multiplier")
    offset: Range = Field(default=Range(p=0.8, low=-20.0, high=20.0), description="per-band offset, DN")
    gamma: Range = Field(default=Range(p=0.5, low=0.7, high=1.4), description="exponent on the 0..1 scale")
    noise: Range = Field(default=Range(p=0.5, low=0.0, high=6.0), description="gaussian noise std, DN")
    bands: int | None = Field(
        default=4, ge=1, description="leading bands that are optical and augmented (None = every band)"
    )

    @model_validator(mode="after")
    def _valid_ranges(self) -> RadiometricAugmentConfig:
        checks = {
            "airlight": 0.0 <= self.airlight[0] <= self.airlight[1] <= 255.0,
            "blur": self.blur.low >= 0.0,
            "gain": self.gain.low >= 0.0,
            "gamma": self.gamma.low > 0.0,
            "haze": self.haze.low >= 0.0 and self.haze.high <= 1.0,
            "noise": self.noise.low >= 0.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"out of range: {', '.join(bad)}; accepted: airlight within 0..255, blur/gain/noise >= 0, "
                "gamma > 0, haze within 0..1"
            )
        return self


def gaussian_blur(bands: F32, sigma: float) -> F32:
    """Separable Gaussian blur of (k, H, W) with reflected borders (an FFT filter would wrap edges around).

    One definition for the synthetic departements, training augmentation and the selection's tuning shifts.
    """
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    height, width = bands.shape[1:]
    padded = np.pad(bands, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    rows = np.zeros((bands.shape[0], height + 2 * radius, width), dtype=np.float32)
    for offset, weight in enumerate(kernel):
        rows += weight * padded[:, :, offset : offset + width]
    out = np.zeros_like(bands)
    for offset, weight in enumerate(kernel):
        out += weight * rows[:, offset : offset + height]
    return out


def radiometric_augment(image: U8, rng: np.random.Generator, config: RadiometricAugmentConfig | None = None) -> U8:
    """Perturb the radiometry of one raw tile (seeded), keeping its geometry and labels valid.

    Args:
        image: (C, H, W) uint8 tile in digital numbers.
        rng: Source of every draw (which transforms apply and how strongly).
        config: Probabilities and ranges (the defaults when None).

    Returns:
        A new (C, H, W) uint8 tile; the input is not modified. Bands beyond ``config.bands`` are unchanged.

    Raises:
        InvalidTileError: The image is not a (C, H, W) uint8 array.

    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise InvalidTileError("image", f"{image.dtype} {image.shape}", "a (bands, height, width) uint8 array")
    cfg = config or RadiometricAugmentConfig()
    out = image.astype(np.float32)
    n = image.shape[0] if cfg.bands is None else min(cfg.bands, image.shape[0])
    light = out[:n]
    if rng.random() < cfg.haze.p:
        t = cfg.haze.draw(rng)
        air = Range(p=1.0, low=cfg.airlight[0], high=cfg.airlight[1]).draw_bands(rng, n)
        light[:] = (1 - t) * light + t * air
    if rng.random() < cfg.blur.p:
        sigma = cfg.blur.draw(rng)
        if sigma > 0:
            light[:] = gaussian_blur(light, sigma)
    if rng.random() < cfg.gain.p:
        light *= cfg.gain.draw_bands(rng, n)
    if rng.random() < cfg.offset.p:
        light += cfg.offset.draw_bands(rng, n)
    np.clip(light, 0, 255, out=light)
    if rng.random() < cfg.gamma.p:
        light[:] = 255.0 * (light / 255.0) ** np.float32(cfg.gamma.draw(rng))
    if rng.random() < cfg.noise.p:
        light += rng.normal(0.0, cfg.noise.draw(rng), size=light.shape).astype(np.float32)
    augmented: U8 = np.rint(np.clip(out, 0, 255)).astype(np.uint8)
    return augmented
