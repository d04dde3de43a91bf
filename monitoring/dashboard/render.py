"""Server-side rendering of the dashboard page: the departement map (inline SVG), timelines, tables.

No CDN, no JavaScript framework: the page works without scripts (the small static script only reloads it when the
state file changes).
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from monitoring.dashboard.colours import DRIFT_SCALE, NOT_MONITORED, drift_colour
from monitoring.dashboard.countries import region_country, render_country_map
from monitoring.dashboard.state import DashboardState, RegionState, region_to_insee
from terradapt.records import RolloutStep

#: Environment variable overriding where the departement boundaries are read from.
GEOJSON_ENV: Final = "TERRADAPT_DEPARTEMENTS_GEOJSON"
#: Default boundaries: the shared data folder, relative to the project root.
DEFAULT_GEOJSON: Final = Path("../shared/data/france_departements/departements-version-simplifiee.geojson")
PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]


# -- map -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DepartementMap:
    """Departement outlines projected to SVG path data, computed once per server.

    The projection is equirectangular with longitudes scaled by cos(46.5 deg): at France's size this keeps shapes
    recognisable without a projection library. Points closer than ``min_step`` pixels are dropped, which keeps the
    page around 100 KB instead of the GeoJSON's 570 KB.
    """

    width: float
    height: float
    paths: dict[str, str]
    names: dict[str, str]
    anchors: dict[str, tuple[float, float]]
    source: Path

    @classmethod
    def load(cls, path: Path, width: float = 520.0, min_step: float = 0.7) -> DepartementMap:
        """Read a GeoJSON FeatureCollection with ``code``/``nom`` properties and project it."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        features = data["features"]
        rings_by_code: dict[str, list[list[tuple[float, float]]]] = {}
        names: dict[str, str] = {}
        for feat in features:
            code = str(feat["properties"]["code"])
            names[code] = str(feat["properties"].get("nom", code))
            geom = feat["geometry"]
            polygons = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
            rings_by_code[code] = [[(float(x), float(y)) for x, y, *_ in ring] for poly in polygons for ring in poly]
        points = [p for rings in rings_by_code.values() for ring in rings for p in ring]
        lon0, lon1 = min(p[0] for p in points), max(p[0] for p in points)
        lat0, lat1 = min(p[1] for p in points), max(p[1] for p in points)
        kx = math.cos(math.radians((lat0 + lat1) / 2))
        scale = width / ((lon1 - lon0) * kx)
        height = (lat1 - lat0) * scale

        def project(lon: float, lat: float) -> tuple[float, float]:
            return (lon - lon0) * kx * scale, (lat1 - lat) * scale

        paths: dict[str, str] = {}
        anchors: dict[str, tuple[float, float]] = {}
        for code, rings in rings_by_code.items():
            parts: list[str] = []
            biggest: tuple[float, float, float] = (-1.0, 0.0, 0.0)
            for ring in rings:
                xy = [project(lon, lat) for lon, lat in ring]
                kept = [xy[0]]
                for p in xy[1:]:
                    if math.hypot(p[0] - kept[-1][0], p[1] - kept[-1][1]) >= min_step:
                        kept.append(p)
                if len(kept) < 3:
                    continue
                parts.append("M" + "L".join(f"{x:.1f} {y:.1f}" for x, y in kept) + "Z")
                xs, ys = [p[0] for p in kept], [p[1] for p in kept]
                area = (max(xs) - min(xs)) * (max(ys) - min(ys))
                if area > biggest[0]:
                    biggest = (area, sum(xs) / len(xs), sum(ys) / len(ys))
            paths[code] = "".join(parts)
            anchors[code] = (biggest[1], biggest[2])
        return cls(width, height, paths, names, anchors, Path(path))


def default_geojson_path() -> Path:
    """The boundaries file: ``$TERRADAPT_DEPARTEMENTS_GEOJSON``, else the shared data folder."""
    override = os.environ.get(GEOJSON_ENV)
    return Path(override) if override else (PROJECT_ROOT / DEFAULT_GEOJSON).resolve()


# -- rendering -------------------------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ratio_text(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def _pvalue(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "&lt;1e-4"


def _symlog(r: float) -> float:
    """Linear up to the threshold (1), logarithmic beyond: noise and strong drift both stay readable."""
    return r if r <= 1 else 1 + math.log10(r)


def render_map(state: DashboardState | None, dmap: DepartementMap | None, problem: str | None = None) -> str:
    """The departement map as inline SVG, each path filled by its region's current drift ratio."""
    if dmap is None:
        return f'<p class="warn">No departement boundaries: {_e(problem or "")}. Set {GEOJSON_ENV}.</p>'
    regions = state.regions if state else {}
    by_code = {code: rs for r, rs in regions.items() if (code := region_to_insee(r)) is not None}
    out = [
        f'<svg class="map" viewBox="-4 -4 {dmap.width + 8:.0f} {dmap.height + 8:.0f}" role="img" '
        'aria-label="French departements coloured by drift score">'
    ]
    labels = []
    for code in sorted(dmap.paths):
        rs = by_code.get(code)
        name = dmap.names.get(code, code)
        if rs is None:
            out.append(
                f'<path class="dep" d="{dmap.paths[code]}" fill="{NOT_MONITORED}" data-code="{_e(code)}">'
                f"<title>{_e(code)} {_e(name)}: not monitored</title></path>"
            )
            continue
        fill = drift_colour(rs.drift_ratio)
        cls = "dep monitored alarm" if rs.drift_detected else "dep monitored"
        fired = f" ({', '.join(rs.fired)})" if rs.fired else ""
        tip = (
            f"{code} {name} - {rs.region}: drift {_ratio_text(rs.drift_ratio)} threshold{fired}, "
            f"model v{rs.current_version}"
        )
        out.append(
            f'<path class="{cls}" d="{dmap.paths[code]}" fill="{fill}" data-code="{_e(code)}" '
            f'data-region="{_e(rs.region)}" data-ratio="{rs.drift_ratio if rs.drift_ratio is not None else ""}">'
            f"<title>{_e(tip)}</title></path>"
        )
        x, y = dmap.anchors[code]
        labels.append(f'<text class="dep-label" x="{x:.1f}" y="{y:.1f}">{_e(rs.region)}</text>')
    out.extend(labels)
    out.append("</svg>")
    return "".join(out)


def _legend() -> str:
    items = [
        f'<span class="swatch" data-colour="{c}"><svg width="14" height="14"><rect width="14" height="14" '
        f'fill="{c}"/></svg>{_e(label)}</span>'
        for _, c, label in DRIFT_SCALE
    ]
    items.append(
        f'<span class="swatch"><svg width="14" height="14"><rect width="14" height="14" '
        f'fill="{NOT_MONITORED}"/></svg>not monitored</span>'
    )
    return '<div class="legend"><b>drift score / threshold</b>' + "".join(items) + "</div>"


def render_timeline(rs: RegionState, width: int = 560, height: int = 130, *, by_time: bool = False) -> str:
    """One region's drift ratio per tile (symlog), threshold line, first detection and rollouts marked.

    The x axis is the tile order, or with ``by_time`` the tiles' acquisition (capture) time: tiles without one
    are left out, and the others are drawn in capture order, which may differ from their arrival order.
    """
    pad_l, pad_r, pad_t, pad_b = 34, 8, 8, 20
    pts = [p for p in rs.timeline if p.acquired is not None] if by_time else rs.timeline
    if not pts:
        what = "no dated tiles yet" if by_time else "no tiles yet"
        return f'<svg class="timeline" viewBox="0 0 {width} {height}"><text x="40" y="60">{what}</text></svg>'
    at = {p.index: p.acquired.timestamp() if by_time and p.acquired else float(p.index) for p in pts}
    pts = sorted(pts, key=lambda p: at[p.index])
    x0, x1 = min(at.values()), max(max(at.values()), min(at.values()) + 1)
    ymax = max(2.0, max(_symlog(p.ratio) for p in pts) * 1.05)

    def sx(i: float) -> float:
        return pad_l + (i - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(r: float) -> float:
        return pad_t + (1 - _symlog(max(r, 0.0)) / ymax) * (height - pad_t - pad_b)

    out = [f'<svg class="timeline" viewBox="0 0 {width} {height}" role="img" aria-label="drift of {_e(rs.region)}">']
    y1 = sy(1.0)
    out.append(
        f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" height="{y1 - pad_t:.1f}" fill="#fdecea"/>'
    )
    out.append(
        f'<line class="threshold" x1="{pad_l}" x2="{width - pad_r}" y1="{y1:.1f}" y2="{y1:.1f}" '
        'stroke="#d73027" stroke-dasharray="4 3"/>'
    )
    for tick in (0, 1, 10, 100, 1000):
        if _symlog(tick) <= ymax:
            y = sy(tick)
            out.append(f'<text class="tick" x="{pad_l - 4}" y="{y + 3:.1f}" text-anchor="end">{tick}</text>')
    for i in sorted({x0, x1, (x0 + x1) // 2}):
        label = datetime.fromtimestamp(i, UTC).strftime("%Y-%m-%d") if by_time else str(int(i))
        out.append(f'<text class="tick" x="{sx(i):.1f}" y="{height - 6}" text-anchor="middle">{label}</text>')
    if rs.first_detection is not None and rs.first_detection in at:
        x = sx(at[rs.first_detection])
        out.append(
            f'<line class="detect" x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{height - pad_b}" '
            'stroke="#f28e2b" stroke-width="2"/>'
        )
        out.append(f'<text class="mark" x="{x + 3:.1f}" y="{pad_t + 10}" fill="#b35c00">drift</text>')
    for mark in rs.rollouts:
        if mark.index is None or mark.index not in at:
            continue
        x = sx(at[mark.index])
        colour = "#2ca02c" if mark.step == RolloutStep.PROMOTED.value else "#7b3294"
        out.append(
            f'<line class="rollout" x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{height - pad_b}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text class="mark" x="{x + 3:.1f}" y="{pad_t + 22}" fill="{colour}">v{mark.version}</text>')
    line = " ".join(f"{sx(at[p.index]):.1f},{sy(p.ratio):.1f}" for p in pts)
    out.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.6"/>')
    for p in pts:
        if p.fired:
            out.append(f'<circle cx="{sx(at[p.index]):.1f}" cy="{sy(p.ratio):.1f}" r="2.2" fill="#d73027"/>')
    out.append("</svg>")
    return "".join(out)


def _bar(value: float, colour: str, width: int = 120) -> str:
    w = max(0.0, min(1.0, value)) * width
    return (
        f'<svg class="bar" width="{width}" height="10"><rect width="{width}" height="10" fill="#eee"/>'
        f'<rect width="{w:.1f}" height="10" fill="{colour}"/></svg> {_pct(value)}'
    )


def render_page(
    state: DashboardState | None,
    dmap: DepartementMap | None,
    *,
    state_path: Path,
    error: str | None = None,
    map_problem: str | None = None,
    by_time: bool = False,
) -> str:
    """The whole page (server-side rendered: it works without JavaScript; the script only reloads it).

    ``by_time`` plots the drift timelines against acquisition time instead of tile order (``/?x=acquired``).
    """
    title = state.title if state else "terradapt"
    regions = list(state.regions.values()) if state else []
    names = dmap.names if dmap else {}
    body: list[str] = []
    if error:
        body.append(f'<p class="error">{_e(error)}</p>')
    elif state is None:
        body.append(
            f'<p class="warn">No state file yet at {_e(state_path)}: run <code>terradapt demo</code> '
            "(it writes report/state.json) or point the dashboard at a runner's state file.</p>"
        )
    if state is not None:
        adapted = [a for r in regions for a in r.adaptations]
        chips = [
            ("regions", len(regions)),
            ("tiles", sum(r.tiles for r in regions)),
            ("in drift now", sum(r.drift_detected for r in regions)),
            ("drift alarms", state.drift_events),
            (f"flagged at FDR {state.fdr_q:g}", len(state.fdr_flagged)),
            ("adaptations accepted", sum(a.accepted for a in adapted)),
            ("rejected", sum(not a.accepted for a in adapted)),
            ("rollouts", sum(len(r.rollouts) for r in regions)),
            ("dead letters", sum(state.dead_letters.values())),
        ]
        body.append(
            '<div class="chips">'
            + "".join(f'<div class="chip"><b>{v}</b><span>{_e(k)}</span></div>' for k, v in chips)
            + "</div>"
        )

    rows = []
    for r in regions:
        code = region_to_insee(r.region)
        name = names.get(code, "") if code else ""
        acc = " ".join(f"v{a.version}: {_pct(a.miou)}" for a in r.accuracy) or "-"
        held = r.held_out_miou
        held_txt = f"{_pct(held.get('source'))} -> {_pct(held.get('current'))}" if held else "-"
        swatch = (
            f'<svg width="12" height="12"><rect width="12" height="12" fill="{drift_colour(r.drift_ratio)}"/></svg>'
        )
        rows.append(
            f'<tr data-region="{_e(r.region)}"><td><b>{_e(r.region)}</b></td><td>{_e(name)}</td>'
            f"<td>{_e(r.shift or '')}</td><td class='num'>{r.tiles}</td>"
            f"<td class='num'>{swatch} {_ratio_text(r.drift_ratio)}</td><td>{_e(', '.join(r.fired) or '-')}</td>"
            f"<td class='num'>{r.first_detection if r.first_detection is not None else '-'}</td>"
            f"<td class='num'>{_pvalue(r.p_value)}{' <b>flagged</b>' if r.fdr_flagged else ''}</td>"
            f"<td class='num'>v{r.current_version}</td><td>{_e(acc)}</td><td>{_e(held_txt)}</td></tr>"
        )
    table = (
        '<table class="regions"><thead><tr><th>region</th><th>name</th><th>shift</th><th>tiles</th>'
        "<th>drift now</th><th>signals firing</th><th>detected at tile</th>"
        "<th>p-value (cross-region review)</th><th>model</th>"
        "<th>mIoU by version (delayed labels)</th><th>held-out mIoU source -> current</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="11">no regions yet</td></tr>')
        + "</tbody></table>"
    )
    off_map = [r.region for r in regions if region_to_insee(r.region) is None and region_country(r.region) is None]
    off_map_note = f'<p class="note">On neither map: {_e(", ".join(off_map))}</p>' if off_map else ""
    departements = any(region_to_insee(r.region) is not None for r in regions)
    countries = render_country_map(state)
    maps = ""
    shown = departements or not countries  # the departement map (its boundaries' attribution goes in the footer)
    if shown:
        maps += "<h2>Drift now, by departement</h2>" + render_map(state, dmap, map_problem)
    if countries:
        maps += "<h2>Drift now, by country <small>(crop regions; tile-grid map)</small></h2>" + countries
    body.append(
        '<section class="top"><div class="card mapcard">'
        + maps
        + _legend()
        + off_map_note
        + f'</div><div class="card"><h2>Regions</h2>{table}</div></section>'
    )

    timelines = "".join(
        f'<div class="tl"><h3>{_e(r.region)} <small>{_e(names.get(region_to_insee(r.region) or "", ""))} '
        f"{_e(r.shift or '')}</small></h3>{render_timeline(r, by_time=by_time)}</div>"
        for r in regions
    )
    body.append(
        '<section class="card"><h2>Drift over time <small>score / threshold per tile (symlog; red band = '
        "alarm; orange = first detection; green = version rolled out); x: "
        + (
            '<a href="/">tile order</a> | <b>acquisition time</b>'
            if by_time
            else '<b>tile order</b> | <a href="/?x=acquired">acquisition time</a>'
        )
        + "</small></h2>"
        f'<div class="timelines">{timelines or "<p>no tiles yet</p>"}</div></section>'
    )

    acc_rows = "".join(
        f"<tr><td>{_e(r.region)}</td><td>v{a.version}{' (served)' if a.version == r.current_version else ''}</td>"
        f"<td class='num'>{a.pixels:,}</td><td>{_bar(a.accuracy, '#4e79a7')}</td>"
        f"<td>{_bar(a.miou, '#59a14f')}</td></tr>"
        for r in regions
        for a in r.accuracy
    )
    body.append(
        '<section class="bottom"><div class="card"><h2>Accuracy by region and model version '
        "<small>delayed labels joined with each version's own predictions</small></h2>"
        '<table class="acc"><thead><tr><th>region</th><th>version</th><th>labelled pixels</th>'
        "<th>pixel accuracy</th><th>mIoU</th></tr></thead><tbody>"
        + (acc_rows or '<tr><td colspan="5">no labels yet</td></tr>')
        + "</tbody></table></div>"
    )

    log_rows = []
    for r in regions:
        rolled = {m.version: m for m in r.rollouts}
        for a in r.adaptations:
            m = rolled.pop(a.version, None)
            verdict = "accepted" if a.accepted else "rejected: " + "; ".join(a.reasons)
            step = f"{m.step} at tile {m.index}" if m and m.index is not None else (m.step if m else "-")
            log_rows.append(
                f"<tr><td>{_e(r.region)}</td><td>v{a.parent} -> v{a.version}</td><td>{_e(a.method)}</td>"
                f"<td class='{'ok' if a.accepted else 'bad'}'>{_e(verdict)}</td><td>{_e(step)}</td></tr>"
            )
        for m in rolled.values():
            log_rows.append(
                f"<tr><td>{_e(r.region)}</td><td>v{m.previous} -> v{m.version}</td><td>-</td><td>-</td>"
                f"<td>{_e(m.step)}</td></tr>"
            )
    dead = "".join(
        f"<tr><td>{_e(k)}</td><td class='num'>{v}</td></tr>"
        for k, v in sorted((state.dead_letters if state else {}).items())
    )
    body.append(
        '<div class="card"><h2>Model versions and rollouts</h2><table class="log"><thead><tr><th>region</th>'
        "<th>version</th><th>method</th><th>safety gate</th><th>rollout</th></tr></thead><tbody>"
        + ("".join(log_rows) or '<tr><td colspan="5">no adaptation yet</td></tr>')
        + "</tbody></table>"
        '<h2>Dead letters</h2><table class="log"><thead><tr><th>reason</th><th>count</th></tr></thead><tbody>'
        + (dead or '<tr><td colspan="2">none</td></tr>')
        + "</tbody></table></div></section>"
    )

    generated = state.generated_at.strftime("%Y-%m-%d %H:%M:%S UTC") if state else "-"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/dashboard.css"></head><body>'
        f'<header><h1>{_e(title)}</h1><span class="meta">state {_e(state_path)} - updated {_e(generated)}'
        '<span id="live"></span></span></header><main>'
        + "".join(body)
        + "</main><footer>"
        + ("Departement boundaries: IGN GEOFLA, INSEE, via france-geojson (Etalab Licence Ouverte)." if shown else "")
        + "</footer>"
        '<script src="/static/dashboard.js"></script></body></html>'
    )
