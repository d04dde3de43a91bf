"""The country map of the dashboard: a tile-grid map of Europe, one square per country, coloured by drift.

Crop regions are countries or parts of them: ``lv-1`` (ISO 3166 code + number, the synthetic countries and the
layout EuroCrops uses per country) or a NUTS-style code such as ``frh-1`` (BreizhCrops' ``frh01``: NUTS FRH01, in
France). A region's country is its first two letters when the letter part has 2 to 4 letters and those two letters
are a country of the grid. No boundaries are needed (nothing is downloaded; the shared data holds French
departements only): the grid keeps each country's rough place (north up, west left) at equal size, which is what a
per-country status needs. Each square is coloured by the largest drift ratio among its regions.
"""

from __future__ import annotations

import html
import re
from typing import Final

from monitoring.dashboard.colours import NOT_MONITORED, drift_colour
from monitoring.dashboard.state import DashboardState, RegionState

__all__ = ["EUROPE_GRID", "region_country", "render_country_map"]

#: ISO 3166-1 alpha-2 code -> (column, row, name) of the tile grid.
EUROPE_GRID: Final[dict[str, tuple[int, int, str]]] = {
    "IS": (0, 0, "Iceland"),
    "NO": (5, 0, "Norway"),
    "SE": (6, 0, "Sweden"),
    "FI": (7, 0, "Finland"),
    "IE": (0, 1, "Ireland"),
    "GB": (1, 1, "United Kingdom"),
    "DK": (5, 1, "Denmark"),
    "EE": (7, 1, "Estonia"),
    "BE": (2, 2, "Belgium"),
    "NL": (3, 2, "Netherlands"),
    "DE": (4, 2, "Germany"),
    "PL": (5, 2, "Poland"),
    "LT": (6, 2, "Lithuania"),
    "LV": (7, 2, "Latvia"),
    "FR": (2, 3, "France"),
    "LU": (3, 3, "Luxembourg"),
    "CZ": (4, 3, "Czechia"),
    "SK": (5, 3, "Slovakia"),
    "UA": (6, 3, "Ukraine"),
    "PT": (0, 4, "Portugal"),
    "ES": (1, 4, "Spain"),
    "CH": (2, 4, "Switzerland"),
    "AT": (3, 4, "Austria"),
    "HU": (4, 4, "Hungary"),
    "RO": (5, 4, "Romania"),
    "MD": (6, 4, "Moldova"),
    "IT": (3, 5, "Italy"),
    "SI": (4, 5, "Slovenia"),
    "HR": (5, 5, "Croatia"),
    "RS": (6, 5, "Serbia"),
    "BG": (7, 5, "Bulgaria"),
    "MT": (3, 6, "Malta"),
    "BA": (5, 6, "Bosnia and Herzegovina"),
    "ME": (6, 6, "Montenegro"),
    "MK": (7, 6, "North Macedonia"),
    "AL": (6, 7, "Albania"),
    "GR": (7, 7, "Greece"),
    "CY": (8, 7, "Cyprus"),
}

_REGION = re.compile(r"^(?P<letters>[a-z]{2,4})-[0-9]+$")
_CELL: Final = 46
_TILE: Final = 42


def region_country(region: str) -> str | None:
    """The ISO code of the grid country a region belongs to (``lv-1`` -> ``LV``, ``frh-1`` -> ``FR``), else None."""
    m = _REGION.match(region)
    if m is None:
        return None
    code = m.group("letters")[:2].upper()
    return code if code in EUROPE_GRID else None


def render_country_map(state: DashboardState | None) -> str:
    """The tile-grid map as inline SVG; empty when no region of the state belongs to a grid country."""
    by_country: dict[str, list[RegionState]] = {}
    for region, rs in (state.regions if state else {}).items():
        country = region_country(region)
        if country is not None:
            by_country.setdefault(country, []).append(rs)
    if not by_country:
        return ""
    cols = 1 + max(c for c, _, _ in EUROPE_GRID.values())
    rows = 1 + max(r for _, r, _ in EUROPE_GRID.values())
    out = [
        f'<svg class="map countries" viewBox="0 0 {cols * _CELL} {rows * _CELL}" role="img" '
        'aria-label="European countries (tile grid) coloured by drift score">'
    ]
    for code, (col, row, name) in sorted(EUROPE_GRID.items()):
        x, y = col * _CELL, row * _CELL
        regions = by_country.get(code, [])
        ratios = [r.drift_ratio for r in regions if r.drift_ratio is not None]
        if not regions:
            fill, cls, tip = NOT_MONITORED, "country", f"{code} {name}: not monitored"
        else:
            fill = drift_colour(max(ratios) if ratios else None)
            alarm = any(r.drift_detected for r in regions)
            cls = "country monitored alarm" if alarm else "country monitored"
            tip = f"{code} {name} - " + "; ".join(
                f"{r.region}: drift {_ratio(r.drift_ratio)} threshold, model v{r.current_version}" for r in regions
            )
        names = " ".join(r.region for r in regions)
        out.append(
            f'<g class="{cls}" data-country="{code}" data-regions="{html.escape(names)}">'
            f'<rect x="{x}" y="{y}" width="{_TILE}" height="{_TILE}" rx="4" fill="{fill}"/>'
            f'<text class="country-label" x="{x + _TILE / 2:.0f}" y="{y + _TILE / 2 + 4:.0f}">{code}</text>'
            f"<title>{html.escape(tip)}</title></g>"
        )
    out.append("</svg>")
    return "".join(out)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"
