"""The model interface over every architecture: logits, hooked deep feature, padding, checkpoint round trip."""

import json

import pytest
import torch
from safetensors.torch import save as st_save

from terradapt.architectures import (
    FLAIR_MEAN,
    ArchitectureError,
    SmpConfig,
    build_model,
    model_from_config,
    parse_config,
    resolve_arch,
)
from terradapt.checkpoint import ModelManifest, decode, encode, sha256_hex
from terradapt.errors import UnknownNameError
from terradapt.model import UNet, UNetConfig
from tests.fakes.archs import ARCH_IDS, ARCHS, tile_size, toy_model


@pytest.mark.parametrize("arch", ARCH_IDS)
@pytest.mark.parametrize("size", [None, 40])  # 40 px: not a multiple of the stride (padded, then cropped)
def test_logits_and_pooled_feature_of_every_architecture(arch, size):
    model = toy_model(arch)
    s = size or tile_size(arch)
    logits, pooled = model.forward_features(torch.rand(3, 5, s, s) * 255)
    assert logits.shape == (3, 4, s, s)
    assert pooled.shape == (3, model.feature_dim)
    assert torch.isfinite(pooled).all()
    assert torch.equal(model(torch.zeros(1, 5, s, s)), model.forward_features(torch.zeros(1, 5, s, s))[0])


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_checkpoint_round_trip_keeps_logits_normalisation_and_class_look(arch):
    model = toy_model(arch)
    model.set_normalisation([100.0, 90.0, 80.0, 70.0, 60.0], [40.0, 41.0, 42.0, 43.0, 44.0])
    model.set_class_band_mean(torch.rand(4, 5))
    manifest = ModelManifest(config={}, classes=("a", "b", "c", "d"), bands=("r", "g", "b", "n", "e"))
    weights, manifest_json = encode(model, manifest)
    # the weights hold the network's own tensors only: normalisation and class look are manifest data
    stored = json.loads(manifest_json)
    assert stored["input_mean"] == pytest.approx([100.0, 90.0, 80.0, 70.0, 60.0])
    assert len(stored["class_band_mean"]) == 4
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}
    restored, m = decode(weights, manifest_json)
    assert type(restored) is type(model)
    assert m.architecture == ("unet" if arch == "unet" else "smp")
    x = torch.rand(2, 5, tile_size(arch), tile_size(arch)) * 255
    assert torch.equal(restored(x), model(x))
    assert torch.equal(restored.class_band_mean, model.class_band_mean)


def test_format_1_checkpoints_still_load():
    """Before other architectures: buffers in the weights, U-Net layers at the top level."""
    model = toy_model("unet")
    model.set_normalisation([120.0] * 5, [50.0] * 5)
    model.set_class_band_mean(torch.full((4, 5), 0.25))
    old = {k.removeprefix("net."): v for k, v in model.state_dict().items()}
    old |= {"input_mean": model.input_mean, "input_std": model.input_std, "class_band_mean": model.class_band_mean}
    weights = st_save({k: v.contiguous() for k, v in old.items()})
    manifest = ModelManifest(
        format_version=1, config=ARCHS["unet"].to_dict(), classes=tuple("abcd"), bands=tuple("rgbne")
    ).model_copy(update={"sha256": sha256_hex(weights)})
    restored, _ = decode(weights, manifest.model_dump_json())
    x = torch.rand(1, 5, 32, 32) * 255
    assert torch.equal(restored(x), model(x))
    assert torch.equal(restored.class_band_mean, model.class_band_mean)


def test_specs_and_configs_are_checked():
    flair = resolve_arch("flair-baseline", in_channels=5, num_classes=13)
    assert flair.config == SmpConfig(in_channels=5, num_classes=13, arch="Unet", encoder="resnet34")
    assert flair.normalisation is not None and flair.normalisation[0] == FLAIR_MEAN
    assert flair.tile_size == 512
    assert resolve_arch("small", in_channels=3, num_classes=6).config == UNetConfig(in_channels=3, num_classes=6)
    fpn = resolve_arch("smp:FPN:efficientnet-b0", in_channels=4, num_classes=7)
    assert model_from_config(fpn.config)(torch.zeros(1, 4, 64, 64)).shape == (1, 7, 64, 64)
    with pytest.raises(ArchitectureError, match="5 bands and 13 classes"):
        resolve_arch("flair-baseline", in_channels=3, num_classes=6)
    with pytest.raises(ArchitectureError, match="smp:<Arch>:<encoder>"):
        resolve_arch("resnet", in_channels=3, num_classes=6)
    with pytest.raises(ArchitectureError, match="cannot build"):
        build_model("smp", {"in_channels": 3, "num_classes": 2, "arch": "NoSuchNet", "encoder": "resnet18"})
    with pytest.raises(ArchitectureError, match="unknown key"):
        parse_config("unet", {"in_channels": 3, "num_classes": 2, "width": 9})
    with pytest.raises(ArchitectureError, match="expected int"):
        parse_config("unet", {"in_channels": "3", "num_classes": 2})
    with pytest.raises(UnknownNameError, match="smp"):
        parse_config("vit", {})
    with pytest.raises(ArchitectureError, match="not a layer"):
        build_model(
            "smp", {"in_channels": 3, "num_classes": 2, "arch": "FPN", "encoder": "resnet18", "feature_layer": "x"}
        )


def test_a_named_feature_layer_is_pooled():
    cfg = {"in_channels": 3, "num_classes": 2, "arch": "Unet", "encoder": "resnet18", "feature_layer": "decoder"}
    model = build_model("smp", cfg).eval()
    _, pooled = model.forward_features(torch.rand(2, 3, 64, 64) * 255)
    assert pooled.shape == (2, model.feature_dim)
    assert model.feature_dim == 16  # smp Unet's last decoder block has 16 channels


def test_deeplab_adapts_with_a_batch_of_one_tile():
    """Its image-pooling branch sees a 1 x 1 map: BatchNorm in train mode must not fail on one tile."""
    model = toy_model("smp-deeplabv3plus-resnet18").train()
    out = model(torch.rand(1, 5, 64, 64) * 255)
    assert out.shape == (1, 4, 64, 64)
    assert isinstance(UNet(ARCHS["unet"]).classifier(), torch.nn.Conv2d)  # type: ignore[arg-type]


def test_building_smp_models_opens_no_connection(monkeypatch):
    """encoder_weights=None: no hub download, whatever the architecture or encoder."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while building a model: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for spec in ("flair-baseline", "smp:FPN:efficientnet-b0", "smp:UnetPlusPlus:resnet18"):
        model = model_from_config(resolve_arch(spec, in_channels=5, num_classes=13).config)
        assert model(torch.zeros(1, 5, 64, 64)).shape == (1, 13, 64, 64)
