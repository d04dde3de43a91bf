"""The architectures the contract tests run over: the small U-Net and two segmentation-models-pytorch models.

Small sizes keep them quick on CPU: 4 classes, 5 bands; smp models at 64 px (their encoder strides by 32, so the
deepest stage is 2 x 2 and still has spatial statistics).
"""

from __future__ import annotations

from pathlib import Path

import torch

from terradapt.architectures import SmpConfig, model_from_config
from terradapt.model import ArchConfig, SegmentationModel, UNetConfig

ARCHS: dict[str, ArchConfig] = {
    "unet": UNetConfig(in_channels=5, num_classes=4, base_channels=4, depth=2),
    "smp-unet-resnet18": SmpConfig(in_channels=5, num_classes=4, arch="Unet", encoder="resnet18"),
    "smp-deeplabv3plus-resnet18": SmpConfig(in_channels=5, num_classes=4, arch="DeepLabV3Plus", encoder="resnet18"),
}
ARCH_IDS = list(ARCHS)


def tile_size(arch: str) -> int:
    """The tile size a contract test uses for ``arch``."""
    return 32 if arch == "unet" else 64


def toy_model(arch: str, seed: int = 0) -> SegmentationModel:
    """A seeded model of ``arch`` whose BatchNorm running statistics have seen a few random tiles (eval mode)."""
    torch.manual_seed(seed)
    model = model_from_config(ARCHS[arch])
    size = tile_size(arch)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 5, size, size) * 255)
    return model.eval()


def groupnorm_model(seed: int = 0) -> SegmentationModel:
    """The small U-Net with every BatchNorm replaced by GroupNorm: a model without BatchNorm layers."""
    from torch import nn

    torch.manual_seed(seed)
    model = model_from_config(ARCHS["unet"])
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, nn.GroupNorm(2, child.num_features))
    with torch.no_grad():  # confident enough that the reliable-sample filters of EATA and SAR keep pixels
        model.classifier().weight.mul_(8.0)
    return model.eval()


def user_flair_checkpoint(path: Path, seed: int = 0) -> torch.nn.Module:
    """What a FLAIR user has: a Lightning-style checkpoint of smp Unet + resnet34, 5 bands, 13 classes."""
    import segmentation_models_pytorch as smp

    from terradapt.architectures import FLAIR_MEAN, FLAIR_STD

    torch.manual_seed(seed)
    net = smp.Unet(encoder_name="resnet34", encoder_weights=None, in_channels=5, classes=13)
    mean = torch.tensor(FLAIR_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(FLAIR_STD).view(1, -1, 1, 1)
    net.train()
    with torch.no_grad():  # BatchNorm statistics of FLAIR-normalised inputs
        for _ in range(4):
            net((torch.rand(4, 5, 64, 64) * 255 - mean) / std)
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.eval().state_dict().items()}, "epoch": 3}, path)
    out: torch.nn.Module = net
    return out
