"""Import of users' checkpoints: state dicts and Lightning checkpoints in, identical logits out, pickles refused."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from stream.cli import app
from terradapt.architectures import FLAIR_MEAN, FLAIR_STD, resolve_arch
from terradapt.checkpoint import load_checkpoint
from terradapt.importing import (
    CheckpointImportError,
    UnsafeCheckpointError,
    find_prefix,
    import_checkpoint,
    read_state_dict,
)

CLASSES = ("a", "b", "c", "d")
BANDS = ("r", "g", "b", "n", "e")
NORM = ((100.0, 100.0, 100.0, 100.0, 50.0), (50.0, 50.0, 50.0, 50.0, 80.0))


def _user_model(arch: str = "DeepLabV3Plus"):
    """What a user trained: a plain segmentation-models-pytorch network (it sees normalised bands)."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(3)
    net = smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, in_channels=5, classes=4)
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 5, 64, 64))  # non-trivial BatchNorm statistics
    return net.eval()


def _normalised(x):
    mean = torch.tensor(NORM[0]).view(1, -1, 1, 1)
    std = torch.tensor(NORM[1]).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus"])
def test_state_dict_import_gives_identical_logits(tmp_path, arch):
    net = _user_model(arch)
    path = tmp_path / "user.pth"
    torch.save(net.state_dict(), path)
    spec = resolve_arch(f"smp:{arch}:resnet18", in_channels=5, num_classes=4)
    model, manifest, report = import_checkpoint(path, spec, classes=CLASSES, bands=BANDS, normalisation=NORM)
    x = torch.rand(2, 5, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(model(x), net(_normalised(x)))
    assert report.prefix == "" and report.loaded == len(net.state_dict())
    assert manifest.source_checkpoint == report.sha256 and len(report.sha256) == 64
    assert manifest.method == "import" and manifest.architecture == "smp"


def test_lightning_checkpoint_with_prefix_and_extra_keys(tmp_path):
    net = _user_model()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state["criterion.weight"] = torch.ones(4)  # a loss module's tensor: not part of the network
    path = tmp_path / "epoch=9.ckpt"
    torch.save({"state_dict": state, "epoch": 9, "hyper_parameters": {"lr": 0.01}}, path)
    spec = resolve_arch("smp:DeepLabV3Plus:resnet18", in_channels=5, num_classes=4)
    with pytest.raises(CheckpointImportError, match=r"1 unexpected key\(s\).*criterion.weight"):
        import_checkpoint(path, spec, classes=CLASSES, bands=BANDS, normalisation=NORM)
    model, _, report = import_checkpoint(
        path, spec, classes=CLASSES, bands=BANDS, normalisation=NORM, allow_unexpected=True
    )
    assert report.prefix == "model." and report.ignored == ("criterion.weight",)
    x = torch.rand(1, 5, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(model(x), net(_normalised(x)))


def test_missing_keys_and_wrong_shapes_are_listed(tmp_path):
    net = _user_model()
    state = net.state_dict()
    del state["segmentation_head.0.bias"]
    state["segmentation_head.0.weight"] = torch.zeros(7, 16, 1, 1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    spec = resolve_arch("smp:DeepLabV3Plus:resnet18", in_channels=5, num_classes=4)
    with pytest.raises(CheckpointImportError) as err:
        import_checkpoint(path, spec, classes=CLASSES, bands=BANDS, normalisation=NORM)
    assert "1 missing key(s): segmentation_head.0.bias" in str(err.value)
    assert "segmentation_head.0.weight: checkpoint (7, 16, 1, 1)" in str(err.value)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="needs code to unpickle"):
        read_state_dict(path)
    assert not marker.exists()
    spec = resolve_arch("smp:Unet:resnet18", in_channels=5, num_classes=4)
    result = CliRunner().invoke(app, ["import-model", str(path), "--arch", "smp:Unet:resnet18", "--out", "x"])
    assert result.exit_code == 2 and "import refused" in result.output
    assert not marker.exists()
    assert spec.normalisation is None


def test_safetensors_and_not_a_checkpoint(tmp_path):
    net = _user_model()
    path = tmp_path / "user.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    state, digest = read_state_dict(path)
    assert set(state) == set(net.state_dict()) and len(digest) == 64
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises((CheckpointImportError, UnsafeCheckpointError)):
        read_state_dict(junk)


def test_find_prefix_prefers_the_prefix_matching_most_keys():
    expected = ["encoder.conv1.weight", "decoder.block.weight", "head.weight"]
    provided = ["model.net.encoder.conv1.weight", "model.net.decoder.block.weight", "model.net.head.weight", "x"]
    assert find_prefix(provided, expected) == "model.net."
    assert find_prefix(["a", "b"], expected) == ""


def test_import_model_command_writes_a_loadable_flair_baseline(tmp_path):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    net = smp.Unet(encoder_name="resnet34", encoder_weights=None, in_channels=5, classes=13).eval()
    path = tmp_path / "flair.pth"
    torch.save({"state_dict": {f"model.seg_model.{k}": v for k, v in net.state_dict().items()}}, path)
    out = tmp_path / "imported"
    result = CliRunner().invoke(app, ["import-model", str(path), "--arch", "flair-baseline", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "prefix 'model.seg_model.'" in " ".join(result.output.split())  # the console wraps long paths
    model, manifest = load_checkpoint(out)
    assert manifest.input_mean == pytest.approx(FLAIR_MEAN) and manifest.input_std == pytest.approx(FLAIR_STD)
    assert len(manifest.classes) == 13 and manifest.bands[-1] == "elevation"
    x = torch.rand(1, 5, 64, 64) * 255
    mean = torch.tensor(FLAIR_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(FLAIR_STD).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - mean) / std), atol=1e-5)
