"""``adapters.tile_quality``: flat, clipped and duplicated tiles are set aside; clean tiles never are."""

import copy

import numpy as np
import pytest
import torch

from adapters.buffer import BufferedTile
from adapters.gate import Gate, GateConfig
from adapters.tile_quality import TileQualityConfig, clipped_share, informative_tiles, screen
from terradapt.datasets.synthetic import DEPARTEMENTS, DomainFactors, SyntheticDataset, shift_image
from terradapt.model import UNet, UNetConfig


def _clean(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(5, 32, 32), dtype=np.uint8) for _ in range(n)]


def test_flat_clipped_and_duplicate_tiles_are_set_aside_each_under_its_cause():
    clean = _clean(3)
    partly_black = clean[0].copy()
    partly_black[:, :24] = 0  # 75% of the pixels black in every band, texture left in the rest
    tiles = [
        clean[0],
        np.zeros_like(clean[0]),  # all black: flat
        np.full_like(clean[0], 255),  # saturated: flat
        np.full_like(clean[0], 128),  # constant fill: flat
        partly_black,  # clipped
        clean[0].copy(),  # the first tile again
        clean[1],
        clean[2],
    ]
    found = screen(tiles)
    assert found.informative == (0, 6, 7)
    assert (found.flat, found.clipped, found.duplicate) == ((1, 2, 3), (4,), (5,))
    assert found.excluded == 5 and not found.usable  # 3 of 8 < 50%
    assert found.reason().startswith("degenerate tiles: 3 informative distinct of 8")
    assert clipped_share(partly_black) == pytest.approx(0.75)


def test_one_dark_band_or_a_few_clipped_pixels_keep_a_tile_informative():
    tile = _clean(1)[0]
    tile[3] = 0  # a dead NIR band: the other bands still carry the scene
    tile[:, :4] = 255  # an eighth of the tile saturated (a white roof, a cloud)
    assert screen([tile]).informative == (0,)


def test_usable_needs_the_share_and_at_least_one_tile():
    assert not screen([]).usable
    assert screen(_clean(4) + [np.zeros((5, 32, 32), np.uint8)] * 4).usable  # 4 of 8 = 50%
    assert not screen([np.zeros((5, 32, 32), np.uint8)] * 2, TileQualityConfig(min_informative_share=0.0)).usable


def test_disabled_screen_counts_every_tile():
    found = screen([np.zeros((5, 8, 8), np.uint8)] * 3, TileQualityConfig(enabled=False))
    assert found.informative == (0, 1, 2) and found.usable


def test_float_tiles_are_judged_on_the_uint8_scale():
    tiles = [t.astype(np.float32) for t in _clean(2)] + [np.full((5, 32, 32), 255.0, np.float32)]
    assert screen(tiles).informative == (0, 1)


def test_informative_tiles_drops_degenerate_ones_only_when_enough_remain():
    clean = [BufferedTile(f"c{i}", im) for i, im in enumerate(_clean(3))]
    black = [BufferedTile(f"b{i}", np.zeros((5, 32, 32), np.uint8)) for i in range(2)]
    assert [t.acquisition_id for t in informative_tiles(clean + black)] == ["c0", "c1", "c2"]
    poisoned = clean[:1] + black + [BufferedTile("b9", np.zeros((5, 32, 32), np.uint8))]
    assert informative_tiles(poisoned) == poisoned  # too few: all kept, so the gate refuses with the reason


@pytest.mark.parametrize("size", [64, 128])
def test_clean_synthetic_tiles_are_never_excluded_under_any_shift_preset(size):
    """Neutral on normal data: every departement preset (covariate shifts included), and harsher shifts still."""
    ds = SyntheticDataset(dict.fromkeys(DEPARTEMENTS, 12), size=size, seed=3)
    rng = np.random.default_rng(0)
    harsh = [DomainFactors(illumination=0.3), DomainFactors(illumination=1.8), DomainFactors(haze=0.9, blur_sigma=2)]
    for region in DEPARTEMENTS:
        images = [ds.load(region, i).image for i in ds.tile_ids(region)]
        assert screen(images).excluded == 0, region
        for factors in harsh:
            assert screen([shift_image(im, factors, rng) for im in images]).excluded == 0, (region, factors)


def _model() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=5, num_classes=4, base_channels=4, depth=2)).eval()


def test_gate_refuses_a_candidate_judged_on_degenerate_tiles_whatever_the_other_checks_say():
    current = _model()
    black = torch.zeros(6, 5, 32, 32)
    result = Gate().check(copy.deepcopy(current), current, black)  # an identical candidate passes every other check
    assert not result.accepted
    assert result.reasons == (
        "degenerate tiles: 0 informative distinct of 6 (need 50%; flat 6, clipped 0, duplicate 0)",
    )
    assert result.metrics["tiles"] == 6 and result.metrics["tiles_flat"] == 6
    off = Gate(GateConfig(tile_quality=TileQualityConfig(enabled=False))).check(copy.deepcopy(current), current, black)
    assert off.accepted and "tiles_flat" not in off.metrics


def test_gate_judges_on_the_informative_distinct_tiles_only():
    current = _model()
    clean = torch.from_numpy(np.stack(_clean(4))).float()
    tiles = torch.cat([clean, clean[:1], torch.zeros(1, 5, 32, 32)])  # one duplicate, one black frame
    masks = [np.zeros((32, 32), np.uint8)] * 6
    result = Gate().check(copy.deepcopy(current), current, tiles, masks=masks)
    assert result.accepted, result.reasons
    assert result.metrics["tiles"] == 6 and result.metrics["tiles_informative"] == 4
    assert result.metrics["tiles_duplicate"] == 1 and result.metrics["tiles_flat"] == 1
