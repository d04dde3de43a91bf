import json

import numpy as np
import pytest
import torch

from terradapt.architectures import ArchitectureError
from terradapt.crops.batch import iter_batches, to_batch
from terradapt.crops.checkpoint import CropManifest, build_crop_model, load_crop, save_crop
from terradapt.crops.model import CropBatch, PseLtae, PseLtaeConfig
from terradapt.crops.series import S2_BANDS
from terradapt.crops.synthetic import COUNTRIES, CROP_CLASSES, generate_country
from terradapt.crops.training import band_statistics, predict, score
from terradapt.errors import ChecksumMismatchError, UnknownNameError
from tests.fakes.crops import source_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(seed=0) -> PseLtae:
    torch.manual_seed(seed)
    return PseLtae(PseLtaeConfig(in_channels=10, num_classes=6)).eval()


def test_model_interface_shapes_and_norm_layers():
    model = _model()
    batch = to_batch(generate_country(COUNTRIES["fr-1"], 5, seed=0), pixels=8)
    logits, feature = model.forward_features(batch)
    assert logits.shape == (5, 6) and feature.shape == (5, model.feature_dim)
    assert torch.equal(model(batch), logits)
    assert model.classifier().out_features == 6
    kinds = {type(m).__name__ for m in model.norm_layers()}
    assert {"_BatchNorm1d", "LayerNorm"} <= kinds
    assert model.attention(batch).shape == (5, model.config.n_head, batch.x.shape[1])


def test_masked_dates_change_nothing_and_get_no_attention():
    model = _model()
    parcels = generate_country(COUNTRIES["fr-1"], 3, seed=0)
    batch = to_batch(parcels, pixels=8)
    mask = batch.mask.clone()
    mask[:, :5] = False
    masked = CropBatch(batch.x, batch.doy, mask)
    garbage = CropBatch(batch.x.clone().index_fill_(1, torch.arange(5), 99.0), batch.doy, mask)
    torch.testing.assert_close(model(masked), model(garbage))
    with torch.no_grad():
        assert float(model.attention(masked)[:, :, :5].abs().max()) == 0.0


def test_cloudy_and_nan_pixels_are_filled_and_fully_cloudy_dates_masked():
    parcel = generate_country(COUNTRIES["fr-1"], 1, seed=0, pixels=4)[0]
    parcel.cloud[:] = False
    parcel.cloud[3] = True  # a date cloudy everywhere
    parcel.cloud[4, 0] = True  # one cloudy pixel
    parcel.values[5, :, 1] = np.nan  # one missing pixel
    batch = to_batch([parcel], pixels=4)
    assert not bool(batch.mask[0, 3]) and bool(batch.mask[0, 4]) and bool(batch.mask[0, 5])
    assert torch.isfinite(batch.x).all()
    clear = parcel.values[4, :, 1:].mean(axis=1)
    np.testing.assert_allclose(batch.x[0, 4, :, 0].numpy(), clear, rtol=1e-5)


def test_calendars_of_different_lengths_are_padded_and_masked():
    short = generate_country(COUNTRIES["pt-1"], 1, seed=0)[0]
    long = generate_country(COUNTRIES["lv-1"], 1, seed=0)[0]
    short.values, short.dates, short.cloud = short.values[:10], short.dates[:10], short.cloud[:10]
    batch = to_batch([short, long], pixels=16)
    assert batch.x.shape[1] == long.num_dates
    assert not bool(batch.mask[0, 10:].any())
    assert _model()(batch).shape == (2, 6)


def test_one_parcel_batches_work_in_train_mode():
    model = _model().train()
    batch = to_batch(generate_country(COUNTRIES["fr-1"], 1, seed=0), pixels=1)
    assert model(batch).shape == (1, 6)


def test_checkpoint_is_safetensors_plus_manifest_and_round_trips(tmp_path):
    model = _model()
    model.set_normalisation([0.1] * 10, [0.05] * 10)
    model.set_date_offset(-12)
    manifest = CropManifest(config={}, classes=CROP_CLASSES, bands=S2_BANDS, training_regions=("fr-1",))
    stored = save_crop(tmp_path, model, manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights.safetensors"]
    assert stored.config["n_head"] == 4
    assert stored.input_mean == pytest.approx((0.1,) * 10)
    back, back_manifest = load_crop(tmp_path)
    assert float(back.date_offset) == -12
    batch = to_batch(generate_country(COUNTRIES["fr-1"], 4, seed=0), pixels=8)
    torch.testing.assert_close(back(batch), model(batch))
    assert back_manifest.sha256 == stored.sha256
    (tmp_path / "weights.safetensors").write_bytes((tmp_path / "weights.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(ChecksumMismatchError):
        load_crop(tmp_path)


def test_manifest_rejects_unknown_keys_architectures_and_config_keys(tmp_path):
    save_crop(tmp_path, _model(), CropManifest(config={}, classes=CROP_CLASSES, bands=S2_BANDS))
    data = json.loads((tmp_path / "manifest.json").read_text())
    with pytest.raises(ValueError, match="extra"):
        CropManifest.model_validate(data | {"surprise": 1})
    with pytest.raises(UnknownNameError, match="pse-ltae"):
        build_crop_model("tempcnn", {})
    with pytest.raises(ArchitectureError, match="unknown key"):
        build_crop_model("pse-ltae", {"n_heads": 2})
    with pytest.raises(ArchitectureError, match="integers"):
        build_crop_model("pse-ltae", {"n_head": "4"})


def test_source_model_trains_on_cpu_and_classifies_source_countries():
    model = source_model()
    mean, _ = band_statistics(generate_country(COUNTRIES["fr-1"], 20, seed=9))
    np.testing.assert_allclose(model.input_mean.numpy(), mean, rtol=0.2)
    for region in ("fr-1", "de-1"):
        test = generate_country(COUNTRIES[region], 120, seed=1)
        s = score(predict(model, test), [p.label for p in test], len(CROP_CLASSES))
        assert s.overall_accuracy > 0.9 and s.macro_f1 > 0.85, (region, s)


def test_score_overall_accuracy_and_macro_f1():
    s = score([0, 0, 1, 2], [0, 1, 1, 2], 4)
    assert s.overall_accuracy == pytest.approx(0.75)
    # f1: class0 2/3, class1 2/3, class2 1; class3 absent from truth and predictions -> not averaged
    assert s.macro_f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert len(list(iter_batches(generate_country(COUNTRIES["fr-1"], 5, seed=0), 2))) == 3
