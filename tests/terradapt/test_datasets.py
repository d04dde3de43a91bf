"""Tests of terradapt.datasets: synthetic scenes and domains, FLAIR layout, the real Dubai set, patches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from terradapt.classes import DUBAI_PALETTE, IGNORE_INDEX, flair_to_13
from terradapt.datasets import (
    DEPARTEMENTS,
    DomainFactors,
    DubaiDataset,
    FlairDataset,
    Sample,
    SyntheticDataset,
    TileDataset,
    discover,
    generate_scene,
    iter_patches,
    write_flair_dataset,
)
from terradapt.datasets.dubai import rgb_to_classes
from terradapt.datasets.synthetic import shift_image
from terradapt.errors import InvalidTileError, UnknownRegionError
from tests.fakes.flair_tiles import write_tile

WATER, CONIFER, DECIDUOUS, AGRI, PLOWED = 5, 6, 7, 11, 12
NIR = 3


def _scenes(region: str, count: int = 12, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    pairs = [generate_scene(rng, size, DEPARTEMENTS[region]) for _ in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _share(labels: np.ndarray, *raw: int) -> float:
    return float(np.isin(labels, raw).mean())


# --- synthetic scenes -------------------------------------------------------------------------------------


def test_scene_format_and_determinism() -> None:
    image, labels = generate_scene(np.random.default_rng(7), 96, DEPARTEMENTS["D033"])
    assert image.shape == (5, 96, 96)
    assert image.dtype == np.uint8
    assert labels.shape == (96, 96)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(range(1, 20))
    again = generate_scene(np.random.default_rng(7), 96, DEPARTEMENTS["D033"])
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(labels, again[1])
    other = generate_scene(np.random.default_rng(8), 96, DEPARTEMENTS["D033"])
    assert not np.array_equal(labels, other[1])


def test_scenes_are_spatially_coherent() -> None:
    # Neighbouring pixels mostly share a label: layouts are made of objects, not salt-and-pepper noise.
    _, labels = _scenes("D033", count=4)
    same = (labels[:, 1:, :] == labels[:, :-1, :]).mean()
    assert same > 0.9
    assert len(np.unique(labels)) >= 8


def test_vegetation_is_bright_in_nir_and_water_dark() -> None:
    images, labels = _scenes("D029")
    nir = images[:, NIR]
    assert nir[labels == DECIDUOUS].mean() > nir[labels == WATER].mean() + 80
    assert images[:, 4][labels == CONIFER].mean() > images[:, 4][labels == AGRI].mean() + 50  # trees are tall


def test_label_shift_d029_has_more_water_and_forest() -> None:
    _, source = _scenes("D033")
    _, shifted = _scenes("D029")
    assert _share(shifted, WATER) > 2 * _share(source, WATER)
    assert _share(shifted, CONIFER, DECIDUOUS) > 1.5 * _share(source, CONIFER, DECIDUOUS)
    assert _share(shifted, AGRI, PLOWED) < _share(source, AGRI, PLOWED)


def test_radiometric_shift_d013_but_not_d040() -> None:
    source, source_labels = _scenes("D033")
    d013, d013_labels = _scenes("D013")
    d040, _ = _scenes("D040")
    np.testing.assert_array_equal(source_labels, d013_labels)  # neutral prior: same layouts, new look
    assert abs(float(d013[:, NIR].mean()) - float(source[:, NIR].mean())) > 10
    assert abs(float(d040[:, NIR].mean()) - float(source[:, NIR].mean())) < 4


def test_season_darkens_vegetation_nir() -> None:
    source, labels = _scenes("D033")
    spring, _ = _scenes("D067")
    deciduous = labels == DECIDUOUS
    assert spring[:, NIR][deciduous].mean() < source[:, NIR][deciduous].mean() - 30


def test_domain_factors_are_validated_and_immutable() -> None:
    with pytest.raises(ValueError, match="haze"):
        DomainFactors(haze=1.5)
    with pytest.raises(ValueError, match="gain"):
        DomainFactors(gain=(1.0, 1.0))
    factors = DEPARTEMENTS["D029"]
    with pytest.raises(TypeError):
        factors.class_prior[WATER] = 1.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        factors.haze = 0.5  # type: ignore[misc]
    assert factors.prior(WATER) == 4.0
    assert factors.prior(AGRI + 7) == 1.0
    assert hash(factors) == hash(dataclasses.replace(factors))
    assert all(f.description for f in DEPARTEMENTS.values())


def test_shift_image_on_real_looking_rgb() -> None:
    image = np.full((3, 40, 40), 100, dtype=np.uint8)
    hazy = shift_image(image, DomainFactors(haze=1.0, noise_std=0), np.random.default_rng(0))
    assert hazy.dtype == np.uint8
    assert hazy.shape == image.shape
    assert hazy[2].mean() > hazy[0].mean() > 100  # path radiance is strongest in blue


# --- FLAIR layout -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flair")
    write_flair_dataset(root, {"D033": 3, "D029": 2}, size=64, seed=1)
    return root


def test_written_layout_is_flair(flair_root: Path) -> None:
    names = sorted(str(p.relative_to(flair_root)) for p in flair_root.rglob("*.tif"))
    assert names[0].startswith("D029_2021/Z1_")
    assert names[0].endswith("/img/IMG_000001.tif")
    assert any(n.endswith("/msk/MSK_000005.tif") and n.startswith("D033_2021/") for n in names)
    assert len(names) == 10
    assert set(discover(flair_root)) == {"D029", "D033"}


def test_flair_reads_synthetic_back(flair_root: Path) -> None:
    dataset = FlairDataset(flair_root)
    memory = SyntheticDataset({"D033": 3, "D029": 2}, size=64, seed=1)
    assert dataset.regions() == memory.regions() == ["D029", "D033"]
    assert dataset.tile_ids("D033") == memory.tile_ids("D033") == ["000003", "000004", "000005"]
    for region in dataset.regions():
        for tile_id in dataset.tile_ids(region):
            on_disk, in_memory = dataset.load(region, tile_id), memory.load(region, tile_id)
            assert on_disk.mask is not None
            assert in_memory.mask is not None
            assert set(np.unique(on_disk.mask)) <= set(range(13))
            np.testing.assert_array_equal(on_disk.image, in_memory.image)
            np.testing.assert_array_equal(on_disk.mask, in_memory.mask)
            assert on_disk.crs == "EPSG:2154"
            assert on_disk.transform == in_memory.transform
    first, second = dataset.load("D033", "000003"), dataset.load("D033", "000004")
    assert second.transform.c == pytest.approx(first.transform.c + 64 * 0.2)  # adjacent on the zone grid
    assert 400_000 < first.transform.c < 450_000  # Gironde in Lambert-93


def test_write_is_deterministic(tmp_path: Path, flair_root: Path) -> None:
    again = write_flair_dataset(tmp_path, {"D033": 3, "D029": 2}, size=64, seed=1)
    for path in again:
        assert path.read_bytes() == (flair_root / path.relative_to(tmp_path)).read_bytes()


def test_flair_missing_mask_and_errors(tmp_path: Path) -> None:
    write_flair_dataset(tmp_path, {"D033": 2}, size=48)
    mask = next(tmp_path.rglob("MSK_000002.tif"))
    mask.unlink()
    dataset = FlairDataset(tmp_path)
    assert dataset.load("D033", "000002").mask is None
    assert not dataset.has_mask("D033", "000002")
    with pytest.raises(UnknownRegionError, match="D033"):
        dataset.load("D099", "000001")
    with pytest.raises(KeyError, match="999999"):
        dataset.load("D033", "999999")
    bad = tmp_path / "D040_2020" / "Z1_NN" / "img" / "IMG_000100.tif"
    write_tile(bad, bands=3)
    with pytest.raises(InvalidTileError, match="band_count=3"):
        FlairDataset(tmp_path).load("D040", "000100")


def test_discover_names_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "not_a_domain").mkdir()
    with pytest.raises(FileNotFoundError, match="D0NN_YYYY"):
        discover(tmp_path)
    with pytest.raises(FileNotFoundError, match="D0NN_YYYY"):
        FlairDataset(tmp_path / "missing")


def test_synthetic_dataset_rejects_unknown_regions() -> None:
    with pytest.raises(UnknownRegionError, match="D999"):
        SyntheticDataset({"D999": 1})


def test_datasets_implement_the_protocol(flair_root: Path) -> None:
    assert isinstance(FlairDataset(flair_root), TileDataset)
    assert isinstance(SyntheticDataset({"D033": 1}), TileDataset)


# --- patches ----------------------------------------------------------------------------------------------


def test_iter_patches_cover_and_georeference() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (5, 100, 130), dtype=np.uint8)
    mask = rng.integers(0, 13, (100, 130), dtype=np.uint8)
    transform = Affine(0.2, 0, 417_000, 0, -0.2, 6_425_000)
    sample = Sample(image, mask, "D033", "000001", "EPSG:2154", transform)
    patches = list(iter_patches(sample, 64, 48))
    assert len(patches) == 2 * 3
    last = patches[-1]
    assert last.tile_id == "000001_r36_c66"
    np.testing.assert_array_equal(last.image, image[:, 36:, 66:])
    assert last.transform.c == pytest.approx(417_000 + 66 * 0.2)
    assert last.transform.f == pytest.approx(6_425_000 - 36 * 0.2)


def test_iter_patches_pads_small_images_with_ignore() -> None:
    image = np.ones((3, 20, 30), dtype=np.uint8)
    sample = Sample(image, np.zeros((20, 30), dtype=np.uint8), "dubai-1", "x", None, Affine.identity())
    (patch,) = iter_patches(sample, 32)
    assert patch.image.shape == (3, 32, 32)
    assert patch.mask is not None
    assert (patch.mask[:20, :30] == 0).all()
    assert (patch.mask[20:] == IGNORE_INDEX).all()
    assert (patch.mask[:, 30:] == IGNORE_INDEX).all()


# --- Dubai (real data) ------------------------------------------------------------------------------------


def test_rgb_to_classes_takes_the_nearest_colour() -> None:
    rgb = np.array((*DUBAI_PALETTE, (224, 170, 43)), dtype=np.uint8).T[:, None, :]  # last: near water
    np.testing.assert_array_equal(rgb_to_classes(rgb)[0], [0, 1, 2, 3, 4, IGNORE_INDEX, 4])


def test_dubai_root_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TERRADAPT_DUBAI_ROOT", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        DubaiDataset()


def test_dubai_real_class_shares() -> None:
    dataset = DubaiDataset()
    assert dataset.regions() == [f"dubai-{k}" for k in range(1, 9)]
    assert isinstance(dataset, TileDataset)
    counts = np.zeros(256)
    for tile_id in dataset.tile_ids("dubai-5"):
        sample = dataset.load("dubai-5", tile_id)
        assert sample.image.shape[0] == 3
        assert sample.crs is None
        assert sample.mask is not None
        counts += np.bincount(sample.mask.ravel(), minlength=256)
    assert counts[5:255].sum() == 0
    shares = counts[:5] / counts[:5].sum()
    assert shares[4] == pytest.approx(0.52, abs=0.03)  # water, as in shared/data/README.md
    assert shares[1] == pytest.approx(0.38, abs=0.03)  # land


def test_flair_to_13_applied_to_raw_masks() -> None:
    _, raw = generate_scene(np.random.default_rng(3), 64, DEPARTEMENTS["D033"])
    assert set(np.unique(flair_to_13(raw))) <= set(range(13))


def test_dubai_paletted_masks_are_read_like_rgb_ones():
    """Areas 2, 4... store masks as paletted PNGs (one band + colormap): same class shares as the README."""
    ds = DubaiDataset()
    counts = np.zeros(5)
    for tile_id in ds.tile_ids("dubai-4"):
        mask = ds.load("dubai-4", tile_id).mask
        assert mask is not None
        counts += np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=5)[:5]
    shares = counts / counts.sum()
    assert abs(shares[0] - 0.40) < 0.03  # buildings
    assert abs(shares[1] - 0.29) < 0.03  # land
