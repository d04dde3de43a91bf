"""A small U-Net with BatchNorm, sized for CPU, and the input normalisation it carries.

BatchNorm is deliberate: its running statistics are the handle that label-free adaptation methods (AdaBN, TENT)
turn, and the drift monitor reads them. Normalisation lives inside the model as buffers so every runner (in-process,
TorchServe) feeds the same raw uint8 bands and cannot forget to normalise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters (stored in the checkpoint manifest)."""

    in_channels: int = 5
    num_classes: int = 13
    base_channels: int = 16
    depth: int = 3

    def to_dict(self) -> dict[str, int]:
        """Plain dict for the manifest."""
        return asdict(self)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net: ``depth`` down/up levels, channel width doubling per level.

    ``forward`` returns logits (N, K, H, W); ``forward_features`` also returns the globally pooled bottleneck
    (N, C) used as the deep feature of the drift monitor. Inputs are raw band values in [0, 255].
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor
    class_band_mean: torch.Tensor

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.register_buffer("input_mean", torch.full((config.in_channels,), 127.5))
        self.register_buffer("input_std", torch.full((config.in_channels,), 64.0))
        # source mean of every band per class (0..1 scale), set from training labels: the drift monitor's
        # class-conditional radiometry compares each pixel with the source look of its predicted class
        self.register_buffer("class_band_mean", torch.zeros(config.num_classes, config.in_channels))
        self.down = nn.ModuleList()
        cin = config.in_channels
        for w in widths[:-1]:
            self.down.append(_Block(cin, w))
            cin = w
        self.bottleneck = _Block(widths[-2], widths[-1])
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for w_hi, w_lo in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.up.append(nn.ConvTranspose2d(w_hi, w_lo, 2, stride=2))
            self.up_blocks.append(_Block(2 * w_lo, w_lo))
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the per-band input normalisation (computed on the source training tiles)."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-3))

    def set_class_band_mean(self, means: torch.Tensor) -> None:
        """Set the per-class source band means, shape (num_classes, in_channels), 0..1 scale."""
        self.class_band_mean.copy_(means)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, pooled bottleneck features). Sizes not divisible by 2**depth are padded."""
        h, w = x.shape[-2:]
        m = 2**self.config.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        mean = self.input_mean.view(1, -1, 1, 1)
        std = self.input_std.view(1, -1, 1, 1)
        z = (x - mean) / std
        if pad_h or pad_w:
            z = F.pad(z, (0, pad_w, 0, pad_h), mode="reflect")
        skips = []
        for block in self.down:
            z = block(z)
            skips.append(z)
            z = F.max_pool2d(z, 2)
        z = self.bottleneck(z)
        pooled = z.mean(dim=(2, 3))
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips), strict=True):
            z = block(torch.cat([up(z), skip], dim=1))
        logits = self.head(z)[..., :h, :w]
        return logits, pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, H, W)."""
        return self.forward_features(x)[0]


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm layers of a model, in definition order."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def select_device(preference: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)
