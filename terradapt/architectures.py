"""Architectures behind ``SegmentationModel``: the registry, segmentation-models-pytorch models, and presets.

``architecture`` + ``config`` in a manifest name the network; ``build_model`` rebuilds it. Two families:

* ``unet``: the small U-Net of ``terradapt.model`` (CPU default for the demo and tests);
* ``smp``: any segmentation-models-pytorch architecture (``Unet``, ``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``, ...)
  with any encoder it offers (``resnet18``, ``resnet34``, ``efficientnet-b0``, ...), always built with
  ``encoder_weights=None``: nothing is downloaded, weights come from the user's checkpoint. The deep feature is
  the deepest encoder stage, pooled (hooked on ``encoder`` unless the config names another layer).

Presets name a complete spec a user can ask for by name (``--arch flair-baseline``) or write out
(``--arch smp:DeepLabV3Plus:resnet18``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from terradapt.errors import TerradaptError, UnknownNameError
from terradapt.model import ArchConfig, SegmentationModel, UNet, UNetConfig

#: FLAIR #1 normalisation (R, G, B, NIR, elevation; raw 0-255 band values), from the FLAIR baseline configuration.
FLAIR_MEAN = (105.08, 110.87, 101.82, 106.38, 53.26)
FLAIR_STD = (52.17, 45.38, 44.0, 39.69, 79.3)


class ArchitectureError(TerradaptError, ValueError):
    """An architecture spec or config that cannot build a model (unknown smp name, bad config key, wrong size)."""

    reason = "bad_architecture"


@dataclass(frozen=True)
class SmpConfig(ArchConfig):
    """A segmentation-models-pytorch model: architecture class name, encoder name, encoder depth, hooked layer."""

    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_depth: int = 5
    feature_layer: str = "encoder"


class _SingleValueSafeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises with its running statistics when a batch holds one value per channel.

    Image-pooling branches (DeepLabV3+'s ASPP) see a 1 x 1 map: in train mode with a batch of one tile plain
    BatchNorm raises, which would make batch-statistics adaptation fail on exactly the batch sizes a stream has.
    Same parameters and buffers as ``nn.BatchNorm2d``, so checkpoints are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x[0, 0].numel() == 1 and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class SmpModel(SegmentationModel):
    """A segmentation-models-pytorch network behind the terradapt model interface."""

    architecture = "smp"
    config: SmpConfig

    def __init__(self, config: SmpConfig) -> None:
        import segmentation_models_pytorch as smp

        super().__init__(config, feature_layer=config.feature_layer, pad_multiple=2**config.encoder_depth)
        kwargs: dict[str, Any] = {} if config.encoder_depth == 5 else {"encoder_depth": config.encoder_depth}
        try:
            self.net = smp.create_model(
                config.arch,
                encoder_name=config.encoder,
                encoder_weights=None,
                in_channels=config.in_channels,
                classes=config.num_classes,
                **kwargs,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ArchitectureError(
                f"segmentation-models-pytorch cannot build arch={config.arch!r} encoder={config.encoder!r}: {exc}"
            ) from exc
        for m in self.net.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _SingleValueSafeBatchNorm2d
        try:
            self.get_submodule(f"net.{config.feature_layer}")
        except AttributeError as exc:
            raise ArchitectureError(f"feature_layer {config.feature_layer!r} is not a layer of {config.arch}") from exc

    @cached_property
    def feature_dim(self) -> int:  # a named layer's width is probed with one forward, once
        if self.feature_layer == "encoder":
            return int(getattr(self.net.encoder, "out_channels")[-1])  # noqa: B009 (smp encoders declare it)
        with torch.no_grad():
            probe = torch.zeros(1, self.config.in_channels, self.pad_multiple, self.pad_multiple)
            was_training = self.training
            self.eval()
            dim = int(self.forward_features(probe.to(self.input_mean.device))[1].shape[1])
            self.train(was_training)
        return dim

    def encoder_modules(self) -> list[nn.Module]:
        return [self.net.get_submodule("encoder")]

    def classifier(self) -> nn.Conv2d:
        # smp's SegmentationHead: Conv2d, then upsampling (bilinear keeps a constant bias constant), activation
        convs = [m for m in self.net.get_submodule("segmentation_head").modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ArchitectureError(f"{self.config.arch}: no convolution in the segmentation head")
        return convs[-1]


#: manifest ``architecture`` -> (model class, config class)
ARCHITECTURES: dict[str, tuple[type[SegmentationModel], type[ArchConfig]]] = {
    "unet": (UNet, UNetConfig),
    "smp": (SmpModel, SmpConfig),
}


def parse_config(architecture: str, config: dict[str, Any]) -> ArchConfig:
    """The typed config of ``architecture`` from a manifest dict (unknown keys are errors).

    Raises:
        UnknownNameError: the architecture is not registered.
        ArchitectureError: a key the architecture does not know, or a value of the wrong type.

    """
    if architecture not in ARCHITECTURES:
        raise UnknownNameError("architecture", architecture, sorted(ARCHITECTURES))
    config_class = ARCHITECTURES[architecture][1]
    known = {f.name: f.type for f in fields(config_class)}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ArchitectureError(f"{architecture} config has unknown key(s) {unknown}; known: {sorted(known)}")
    for key, value in config.items():
        expected = int if known[key] in ("int", int) else str
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ArchitectureError(f"{architecture} config {key}={value!r}: expected {expected.__name__}")
    return config_class(**config)


def model_from_config(config: ArchConfig) -> SegmentationModel:
    """Build the (untrained) model a typed config describes."""
    for model_class, config_class in ARCHITECTURES.values():
        if type(config) is config_class:
            return model_class(config)  # type: ignore[call-arg]
    raise ArchitectureError(f"no architecture is registered for {type(config).__name__}")


def build_model(architecture: str, config: dict[str, Any]) -> SegmentationModel:
    """Rebuild the network a manifest names (no weights loaded)."""
    return model_from_config(parse_config(architecture, config))


def architecture_of(config: ArchConfig) -> str:
    """The manifest ``architecture`` value of a typed config."""
    for name, (_, config_class) in ARCHITECTURES.items():
        if type(config) is config_class:
            return name
    raise ArchitectureError(f"no architecture is registered for {type(config).__name__}")


@dataclass(frozen=True)
class ArchSpec:
    """A resolved ``--arch``: typed config, fixed normalisation (None: from the training tiles), design tile size."""

    config: ArchConfig
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    tile_size: int | None = None


PRESETS: dict[str, str] = {
    "small": "the small U-Net (BatchNorm, base 16 channels, depth 3): CPU default",
    "flair-baseline": "FLAIR #1 baseline: smp Unet + resnet34, 5 bands (R, G, B, NIR, elevation), 13 classes, "
    "512 px tiles, FLAIR normalisation",
}


def check_arch_spec(spec: str) -> str:
    """``spec`` if it is a valid ``--arch`` value (``resolve_arch`` grammar), without any data to resolve it against.

    Raises:
        ArchitectureError: neither a preset nor ``smp:<Arch>:<encoder>``.

    """
    parts = spec.split(":")
    if spec in (*PRESETS, "unet") or (len(parts) == 3 and parts[0] == "smp" and all(parts[1:])):
        return spec
    raise ArchitectureError(
        f"--arch {spec!r}: expected one of {sorted(PRESETS)} or smp:<Arch>:<encoder> (e.g. smp:DeepLabV3Plus:resnet18)"
    )


def resolve_arch(spec: str, *, in_channels: int, num_classes: int, base_channels: int = 16) -> ArchSpec:
    """Turn an ``--arch`` value into a spec for data with ``in_channels`` bands and ``num_classes`` classes.

    Accepted: ``small`` (or ``unet``), ``flair-baseline``, ``smp:<Arch>:<encoder>`` (e.g. ``smp:FPN:resnet18``).

    Raises:
        ArchitectureError: an unknown spec, or a preset whose band/class count differs from the data's.

    """
    if spec in ("small", "unet"):
        return ArchSpec(UNetConfig(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels))
    if spec == "flair-baseline":
        if (in_channels, num_classes) != (5, 13):
            raise ArchitectureError(
                f"flair-baseline takes 5 bands and 13 classes; the data has {in_channels} bands and "
                f"{num_classes} classes (use smp:Unet:resnet34 for the same network on other data)"
            )
        return ArchSpec(
            SmpConfig(in_channels=5, num_classes=13, arch="Unet", encoder="resnet34"),
            normalisation=(FLAIR_MEAN, FLAIR_STD),
            tile_size=512,
        )
    _, arch, encoder = check_arch_spec(spec).split(":")
    return ArchSpec(SmpConfig(in_channels=in_channels, num_classes=num_classes, arch=arch, encoder=encoder))
