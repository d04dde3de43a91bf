"""The dashboard's country map: which regions are countries, and how the tile grid colours them."""

from __future__ import annotations

from pathlib import Path

from monitoring.dashboard import (
    EUROPE_GRID,
    NOT_MONITORED,
    DashboardState,
    RegionState,
    drift_colour,
    region_country,
    render_country_map,
    render_page,
)


def test_region_codes_of_countries() -> None:
    assert region_country("lv-1") == "LV"
    assert region_country("frh-1") == "FR"  # BreizhCrops' frh01 = NUTS FRH01, in France
    assert region_country("dk-12") == "DK"
    for other in ("D033", "dubai-3", "synth-1", "xx-1", "lv", "LV-1"):
        assert region_country(other) is None, other


def test_grid_has_one_cell_per_country() -> None:
    cells = [(c, r) for c, r, _ in EUROPE_GRID.values()]
    assert len(cells) == len(set(cells))


def state(**regions: RegionState) -> DashboardState:
    return DashboardState(regions=regions)


def test_a_country_takes_the_largest_drift_of_its_regions() -> None:
    calm = RegionState(region="fr-2", drift_ratio=0.3)
    drifting = RegionState(region="frh-1", drift_ratio=2.5, drift_detected=True, fired=("profile",))
    lv = RegionState(region="lv-1", drift_ratio=0.9, current_version=2)
    svg = render_country_map(state(**{"fr-2": calm, "frh-1": drifting, "lv-1": lv}))
    fr = svg.split('data-country="FR"')[1].split("</g>")[0]
    assert 'class="country monitored alarm"' in svg.split('data-country="FR"')[0].rsplit("<g", 1)[1]
    assert 'data-regions="fr-2 frh-1"' in fr and f'fill="{drift_colour(2.5)}"' in fr
    latvia = svg.split('data-country="LV"')[1].split("</g>")[0]
    assert f'fill="{drift_colour(0.9)}"' in latvia and "model v2" in latvia
    spain = svg.split('data-country="ES"')[1].split("</g>")[0]
    assert f'fill="{NOT_MONITORED}"' in spain and "not monitored" in spain


def test_no_country_regions_no_country_map() -> None:
    assert render_country_map(state(D033=RegionState(region="D033"))) == ""
    assert render_country_map(None) == ""


def test_page_with_departements_and_countries_shows_both_maps() -> None:
    page = render_page(
        state(
            D033=RegionState(region="D033", drift_ratio=0.2),
            **{"lv-1": RegionState(region="lv-1", drift_ratio=3.0), "dubai-3": RegionState(region="dubai-3")},
        ),
        None,
        state_path=Path("state.json"),
    )
    assert "Drift now, by departement" in page and "Drift now, by country" in page
    assert "On neither map: dubai-3" in page
