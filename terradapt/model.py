"""The model interface every stage uses, and the small U-Net that is the CPU default.

``SegmentationModel`` wraps a network that maps *normalised* bands to logits. It adds what every runner needs and
must not forget: raw band values in [0, 255] in, the per-band normalisation applied inside, inputs padded to the
network's stride, and the pooled deep feature of the drift monitor taken with a forward hook on a named layer (no
architecture has to expose a special method). The predictor, the drift features, the adapters, the gate, the
registry and the TorchServe handler only use this interface: ``forward`` (logits), ``forward_features`` (logits,
pooled feature), ``norm_layers`` and the config's ``in_channels`` / ``num_classes``.

Normalisation statistics and the per-class source look (``class_band_mean``: the radiometry signal compares each
pixel with the source look of its predicted class) are *data stored in the manifest*, beside the weights; they are
held as non-persistent buffers so they follow ``.to(device)`` but never enter the state dict, which therefore holds
exactly the network's own tensors (what a user's checkpoint holds too).

BatchNorm is deliberate in the default: its running statistics are the handle label-free adaptation methods (AdaBN,
TENT) turn, and the drift monitor reads them. Models with GroupNorm/LayerNorm work too: entropy methods train those
layers' affine parameters, and the BatchNorm-statistics signal is skipped for them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

#: Layers whose affine parameters the entropy methods train.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


@dataclass(frozen=True)
class ArchConfig:
    """What every architecture config has: band count and class count (stored in the manifest)."""

    in_channels: int = 5
    num_classes: int = 13

    def to_dict(self) -> dict[str, int | str]:
        """Plain dict for the manifest."""
        return asdict(self)


class SegmentationModel(nn.Module):
    """Raw bands (N, C, H, W) in [0, 255] -> logits (N, K, H, W), plus the pooled feature of ``feature_layer``.

    Subclasses build ``self.net`` (normalised input -> logits at input size) and name the layer whose output is
    pooled into the deep feature. Inputs whose size is not a multiple of ``pad_multiple`` are padded (reflect; edge
    replicate when the tile is smaller than the padding) and the logits cropped back.
    """

    #: the manifest's ``architecture`` value that builds this class
    architecture: ClassVar[str]
    config: ArchConfig
    net: nn.Module
    input_mean: torch.Tensor
    input_std: torch.Tensor
    class_band_mean: torch.Tensor

    def __init__(self, config: ArchConfig, *, feature_layer: str, pad_multiple: int) -> None:
        super().__init__()
        self.config = config
        self.feature_layer = feature_layer
        self.pad_multiple = pad_multiple
        c, k = config.in_channels, config.num_classes
        self.register_buffer("input_mean", torch.full((c,), 127.5), persistent=False)
        self.register_buffer("input_std", torch.full((c,), 64.0), persistent=False)
        self.register_buffer("class_band_mean", torch.zeros(k, c), persistent=False)

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """Width of the pooled deep feature."""

    @abstractmethod
    def encoder_modules(self) -> list[nn.Module]:
        """The encoder part (what feature-level domain alignment such as ADDA retrains)."""

    @abstractmethod
    def classifier(self) -> nn.Conv2d:
        """The last convolution, whose bias adds a constant per class to the logits (prior correction)."""

    def set_normalisation(self, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]) -> None:
        """Set the per-band input normalisation (raw band units)."""
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-3))

    def set_class_band_mean(self, means: torch.Tensor | Sequence[Sequence[float]]) -> None:
        """Set the per-class source band means, shape (num_classes, in_channels), 0..1 scale."""
        self.class_band_mean.copy_(torch.as_tensor(means, dtype=torch.float32))

    def norm_layers(self) -> list[nn.Module]:
        """Normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm), in definition order."""
        return norm_layers(self)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, pooled feature of ``feature_layer``)."""
        logits, feature = self.forward_feature_map(x)
        pooled = feature.mean(dim=tuple(range(2, feature.dim()))) if feature.dim() > 2 else feature
        return logits, pooled

    def forward_feature_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, the un-pooled output of ``feature_layer``, e.g. (N, C, h, w))."""
        h, w = x.shape[-2:]
        m = self.pad_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        z = (x - self.input_mean.view(1, -1, 1, 1)) / self.input_std.view(1, -1, 1, 1)
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            z = F.pad(z, (0, pad_w, 0, pad_h), mode=mode)
        captured: list[torch.Tensor] = []
        layer = self.get_submodule(f"net.{self.feature_layer}" if self.feature_layer else "net")
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(_last_tensor(out)))
        try:
            logits = self.net(z)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"feature layer {self.feature_layer!r} did not run in the forward pass")
        return logits[..., :h, :w], captured[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, H, W)."""
        return self.forward_features(x)[0]


def _last_tensor(out: Any) -> torch.Tensor:
    """A hooked layer's output as one tensor (encoders return the list of their stages: the deepest is last)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, list | tuple) and out and isinstance(out[-1], torch.Tensor):
        return out[-1]
    raise TypeError(f"the feature layer's output is {type(out).__name__}, not a tensor or a sequence of tensors")


@dataclass(frozen=True)
class UNetConfig(ArchConfig):
    """The small U-Net's hyper-parameters."""

    base_channels: int = 16
    depth: int = 3


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


class _UNetNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            z = block(z)
            skips.append(z)
            z = F.max_pool2d(z, 2)
        z = self.bottleneck(z)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips), strict=True):
            z = block(torch.cat([up(z), skip], dim=1))
        out: torch.Tensor = self.head(z)
        return out


class UNet(SegmentationModel):
    """The small U-Net (BatchNorm): ``depth`` down/up levels, channel width doubling per level; CPU default.

    The deep feature is the pooled bottleneck.
    """

    architecture = "unet"
    config: UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config, feature_layer="bottleneck", pad_multiple=2**config.depth)
        self.net = _UNetNet(config)

    @property
    def feature_dim(self) -> int:
        return int(self.config.base_channels * 2**self.config.depth)

    def encoder_modules(self) -> list[nn.Module]:
        net = self.net
        assert isinstance(net, _UNetNet)
        return [*net.down, net.bottleneck]

    def classifier(self) -> nn.Conv2d:
        head = self.net.head
        assert isinstance(head, nn.Conv2d)
        return head


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Normalisation layers with parameters or statistics (BatchNorm, GroupNorm, LayerNorm, InstanceNorm)."""
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm layers of a model, in definition order."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def select_device(preference: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)
