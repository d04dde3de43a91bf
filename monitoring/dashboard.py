"""The built-in dashboard (``terradapt dashboard``): one local page showing where and when the models drift.

It needs no Grafana, no CDN and no internet: a map of the French departements coloured by each region's current
drift score (boundaries from the shared GeoJSON, drawn as inline SVG), a drift timeline per region with detections
and rollouts marked, the model version each region serves, accuracy by model version on delayed labels, the
adaptation / rollout log and the dead letters.

Its only input is a JSON *state file* (:class:`DashboardState`), written by a runner with :func:`write_state` from
:func:`dashboard_state` (the embedded demo writes ``report/state.json``). The page is rendered on the server from
the file on every request and reloads itself when the file changes, so a runner that rewrites the file while it
streams gives a live view; the dashboard never imports the pipeline (monitoring sits below stream), it reads the
run result through small structural protocols.

The server is the standard library's threaded HTTP server bound to loopback: a read-only page for one operator
needs no framework, and the import stays out of ``import monitoring``.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field, ValidationError

from terradapt.metrics import miou
from terradapt.records import DeadLetter, ModelVersion, RolloutEvent, RolloutStep, utcnow
from terradapt.settings import StrictModel

STATE_SCHEMA_VERSION: Final = 1

#: Environment variable overriding where the departement boundaries are read from.
GEOJSON_ENV: Final = "TERRADAPT_DEPARTEMENTS_GEOJSON"
#: Default boundaries: the shared data folder, relative to the project root.
DEFAULT_GEOJSON: Final = Path("../shared/data/france_departements/departements-version-simplifiee.geojson")
PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]
STATIC_DIR: Final = Path(__file__).resolve().parent / "dashboard_static"

#: Points kept per region timeline: the state file stays small however long the stream runs.
TIMELINE_POINTS: Final = 400

_DEPARTEMENT = re.compile(r"^D0(?P<code>[0-9]{2}|2[AB])$")

#: Drift colour scale on score / threshold (1 = the calibrated alarm line), from calm to far past the line.
DRIFT_SCALE: Final[tuple[tuple[float, str, str], ...]] = (
    (0.5, "#1a9850", "< 0.5"),
    (0.8, "#91cf60", "0.5 - 0.8"),
    (1.0, "#fee08b", "0.8 - 1 (close to threshold)"),
    (2.0, "#fc8d59", "1 - 2 (alarm)"),
    (math.inf, "#d73027", ">= 2 (strong drift)"),
)
NOT_MONITORED: Final = "#e0e0e0"


# -- region codes ----------------------------------------------------------------------------------------------
def region_to_insee(region: str) -> str | None:
    """INSEE departement code of a FLAIR-style region (``D033`` -> ``33``, ``D02A`` -> ``2A``); None otherwise."""
    m = _DEPARTEMENT.match(region)
    return m.group("code") if m else None


def insee_to_region(code: str) -> str:
    """FLAIR-style region of an INSEE departement code (``33`` -> ``D033``, ``2A`` -> ``D02A``).

    Raises:
        ValueError: ``code`` is not a metropolitan departement code.

    """
    region = f"D0{code}"
    if region_to_insee(region) is None:
        raise ValueError(f"departement code {code!r}; accepted: '01'..'95', '2A', '2B'")
    return region


def drift_colour(ratio: float | None) -> str:
    """Fill colour of a region whose largest score / threshold is ``ratio`` (None: not monitored)."""
    if ratio is None or math.isnan(ratio):
        return NOT_MONITORED
    return next(colour for upper, colour, _ in DRIFT_SCALE if ratio < upper)


# -- state file ------------------------------------------------------------------------------------------------
class TimelinePoint(StrictModel):
    """One tile of a region's stream as the monitor saw it."""

    index: int
    ratio: float
    version: int
    fired: tuple[str, ...] = ()


class SignalState(StrictModel):
    """Latest statistic and calibrated threshold of one signal."""

    score: float
    threshold: float


class VersionAccuracy(StrictModel):
    """Accuracy of one model version on the region's labelled tiles it predicted."""

    version: int
    accuracy: float
    miou: float
    pixels: int


class RolloutMark(StrictModel):
    """A rollout step, placed on the timeline at the first tile the new version predicted."""

    version: int
    step: str
    previous: int | None = None
    at: datetime | None = None
    index: int | None = None


class AdaptationMark(StrictModel):
    """An adaptation job's result: the candidate version and the gate's verdict."""

    version: int
    parent: int | None
    method: str
    accepted: bool
    reasons: tuple[str, ...] = ()


class RegionState(StrictModel):
    """Everything the page shows about one region."""

    region: str
    shift: str | None = None
    tiles: int = 0
    current_version: int = 0
    drift_ratio: float | None = None
    drift_detected: bool = False
    fired: tuple[str, ...] = ()
    first_detection: int | None = None
    signals: dict[str, SignalState] = Field(default_factory=dict)
    timeline: list[TimelinePoint] = Field(default_factory=list)
    accuracy: list[VersionAccuracy] = Field(default_factory=list)
    held_out_miou: dict[str, float] = Field(default_factory=dict)
    rollouts: list[RolloutMark] = Field(default_factory=list)
    adaptations: list[AdaptationMark] = Field(default_factory=list)


class DashboardState(StrictModel):
    """The dashboard's input file (``state.json``), versioned so an old page refuses a newer file."""

    schema_version: int = STATE_SCHEMA_VERSION
    title: str = "terradapt"
    generated_at: datetime = Field(default_factory=utcnow)
    regions: dict[str, RegionState] = Field(default_factory=dict)
    dead_letters: dict[str, int] = Field(default_factory=dict)
    drift_events: int = 0


class _TileLike(Protocol):
    """What the dashboard reads of a ``stream.embedded.TileLog``."""

    @property
    def region(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def score_ratio(self) -> float: ...
    @property
    def scores(self) -> Mapping[str, float]: ...
    @property
    def thresholds(self) -> Mapping[str, float]: ...
    @property
    def fired(self) -> tuple[str, ...]: ...


class _GateLike(Protocol):
    @property
    def accepted(self) -> bool: ...
    @property
    def reasons(self) -> tuple[str, ...]: ...


class _AdaptedLike(Protocol):
    @property
    def version(self) -> ModelVersion: ...
    @property
    def gate(self) -> _GateLike: ...


class RunLike(Protocol):
    """What the dashboard reads of a ``stream.embedded.RunResult`` (structural: no import of the stream layer)."""

    @property
    def tiles(self) -> Sequence[_TileLike]: ...
    @property
    def drift_events(self) -> Sequence[object]: ...
    @property
    def adaptations(self) -> Sequence[_AdaptedLike]: ...
    @property
    def rollouts(self) -> Sequence[RolloutEvent]: ...
    @property
    def dead_letters(self) -> Sequence[DeadLetter]: ...
    @property
    def confusion(self) -> Mapping[tuple[str, int], npt.NDArray[np.int64]]: ...
    @property
    def first_detection(self) -> Mapping[str, int]: ...


class RowLike(Protocol):
    """What the dashboard reads of a ``stream.report.RegionRow`` (held-out evaluation of the demo)."""

    @property
    def region(self) -> str: ...
    @property
    def shift(self) -> str: ...
    @property
    def miou_source(self) -> float | None: ...
    @property
    def miou_current(self) -> float | None: ...


class CurrentVersions(Protocol):
    """Where the served version of a region is read (``serving.registry.ModelRegistry`` fits)."""

    def current(self, region: str) -> int: ...


def dashboard_state(
    result: RunLike,
    registry: CurrentVersions | None = None,
    *,
    rows: Sequence[RowLike] = (),
    title: str = "terradapt",
) -> DashboardState:
    """Summarise a run (finished or in progress) into the dashboard's state.

    Args:
        result: The runner's result (``RunResult``); may be read while the run goes on.
        registry: Source of truth for the version each region serves; without it, the last promotion or
            rollback of the run, else the version of the region's last tile.
        rows: Held-out evaluation rows (the demo's ``RegionRow``), shown as source -> current mIoU.
        title: Page title.

    Returns:
        The state to hand to :func:`write_state`.

    """
    by_region: dict[str, list[_TileLike]] = {}
    for t in result.tiles:
        by_region.setdefault(t.region, []).append(t)
    regions = set(by_region) | {r.region for r in result.rollouts} | {a.version.region for a in result.adaptations}
    regions |= {r for r, _ in result.confusion} | {row.region for row in rows}
    row_of = {row.region: row for row in rows}
    out: dict[str, RegionState] = {}
    for region in sorted(regions):
        tiles = by_region.get(region, [])
        last = tiles[-1] if tiles else None
        rollouts = [e for e in result.rollouts if e.region == region]
        out[region] = RegionState(
            region=region,
            shift=row_of[region].shift if region in row_of else None,
            tiles=len(tiles),
            current_version=_current_version(region, registry, rollouts, last),
            drift_ratio=None if last is None else _finite(last.score_ratio),
            drift_detected=bool(last and last.fired),
            fired=tuple(last.fired) if last else (),
            first_detection=result.first_detection.get(region),
            signals=_signals(last),
            timeline=[
                TimelinePoint(index=t.index, ratio=_finite(t.score_ratio), version=t.version, fired=tuple(t.fired))
                for t in tiles[-TIMELINE_POINTS:]
            ],
            accuracy=[_version_accuracy(v, cm) for (r, v), cm in sorted(result.confusion.items()) if r == region],
            held_out_miou=_held_out(row_of.get(region)),
            rollouts=[_rollout_mark(e, tiles) for e in rollouts],
            adaptations=[
                AdaptationMark(
                    version=a.version.version,
                    parent=a.version.parent,
                    method=a.version.method,
                    accepted=a.gate.accepted,
                    reasons=tuple(a.gate.reasons),
                )
                for a in result.adaptations
                if a.version.region == region
            ],
        )
    return DashboardState(
        title=title,
        regions=out,
        dead_letters=dict(Counter(d.reason for d in result.dead_letters)),
        drift_events=len(result.drift_events),
    )


def _signals(last: _TileLike | None) -> dict[str, SignalState]:
    if last is None:
        return {}
    return {
        s: SignalState(score=_finite(v), threshold=_finite(last.thresholds.get(s, 0.0))) for s, v in last.scores.items()
    }


def _finite(x: float) -> float:
    """JSON has no NaN/inf: clamp so the file stays standard JSON."""
    x = float(x)
    if math.isnan(x):
        return 0.0
    return max(min(x, 1e12), -1e12)


def _current_version(
    region: str, registry: CurrentVersions | None, rollouts: Sequence[RolloutEvent], last: _TileLike | None
) -> int:
    if registry is not None:
        return int(registry.current(region))
    moves = [e for e in rollouts if e.step in (RolloutStep.PROMOTED, RolloutStep.ROLLED_BACK)]
    if moves:
        return moves[-1].version
    return last.version if last is not None else 0


def _version_accuracy(version: int, cm: npt.NDArray[np.int64]) -> VersionAccuracy:
    pixels = int(cm.sum())
    accuracy = float(np.trace(cm) / pixels) if pixels else 0.0
    return VersionAccuracy(version=version, accuracy=accuracy, miou=miou(cm), pixels=pixels)


def _held_out(row: RowLike | None) -> dict[str, float]:
    if row is None:
        return {}
    pairs = (("source", row.miou_source), ("current", row.miou_current))
    return {k: float(v) for k, v in pairs if v is not None}


def _rollout_mark(event: RolloutEvent, tiles: Sequence[_TileLike]) -> RolloutMark:
    """Place a rollout at the first tile its version predicted after the previous version's tiles."""
    index = None
    for prev, t in itertools.pairwise(tiles):
        if t.version == event.version and prev.version != event.version:
            index = t.index
    return RolloutMark(
        version=event.version, step=RolloutStep(event.step).value, previous=event.previous, at=event.at, index=index
    )


def write_state(state: DashboardState, path: Path) -> Path:
    """Write the state atomically (temporary file + rename), so the dashboard never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(state.model_dump_json())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the dashboard may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_state(path: Path) -> DashboardState | None:
    """Read a state file; None when it does not exist (yet).

    Raises:
        ValueError: The file is not a valid state (the message names the path and the first problems).

    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = DashboardState.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise ValueError(f"{path} is not a dashboard state file: {problems}") from exc
    if state.schema_version > STATE_SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version={state.schema_version}; accepted: <= {STATE_SCHEMA_VERSION}")
    return state


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


def render_timeline(rs: RegionState, width: int = 560, height: int = 130) -> str:
    """One region's drift ratio per tile (symlog), threshold line, first detection and rollouts marked."""
    pad_l, pad_r, pad_t, pad_b = 34, 8, 8, 20
    pts = rs.timeline
    if not pts:
        return f'<svg class="timeline" viewBox="0 0 {width} {height}"><text x="40" y="60">no tiles yet</text></svg>'
    x0, x1 = pts[0].index, max(pts[-1].index, pts[0].index + 1)
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
        out.append(f'<text class="tick" x="{sx(i):.1f}" y="{height - 6}" text-anchor="middle">{i}</text>')
    if rs.first_detection is not None and x0 <= rs.first_detection <= x1:
        x = sx(rs.first_detection)
        out.append(
            f'<line class="detect" x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{height - pad_b}" '
            'stroke="#f28e2b" stroke-width="2"/>'
        )
        out.append(f'<text class="mark" x="{x + 3:.1f}" y="{pad_t + 10}" fill="#b35c00">drift</text>')
    for mark in rs.rollouts:
        if mark.index is None:
            continue
        x = sx(mark.index)
        colour = "#2ca02c" if mark.step == RolloutStep.PROMOTED.value else "#7b3294"
        out.append(
            f'<line class="rollout" x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{height - pad_b}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text class="mark" x="{x + 3:.1f}" y="{pad_t + 22}" fill="{colour}">v{mark.version}</text>')
    line = " ".join(f"{sx(p.index):.1f},{sy(p.ratio):.1f}" for p in pts)
    out.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.6"/>')
    for p in pts:
        if p.fired:
            out.append(f'<circle cx="{sx(p.index):.1f}" cy="{sy(p.ratio):.1f}" r="2.2" fill="#d73027"/>')
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
) -> str:
    """The whole page (server-side rendered: it works without JavaScript; the script only reloads it)."""
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
            f"<td class='num'>v{r.current_version}</td><td>{_e(acc)}</td><td>{_e(held_txt)}</td></tr>"
        )
    table = (
        '<table class="regions"><thead><tr><th>region</th><th>name</th><th>shift</th><th>tiles</th>'
        "<th>drift now</th><th>signals firing</th><th>detected at tile</th><th>model</th>"
        "<th>mIoU by version (delayed labels)</th><th>held-out mIoU source -> current</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="10">no regions yet</td></tr>')
        + "</tbody></table>"
    )
    off_map = [r.region for r in regions if region_to_insee(r.region) is None]
    off_map_note = f'<p class="note">Not departements (not on the map): {_e(", ".join(off_map))}</p>' if off_map else ""
    body.append(
        '<section class="top"><div class="card mapcard"><h2>Drift now, by departement</h2>'
        + render_map(state, dmap, map_problem)
        + _legend()
        + off_map_note
        + f'</div><div class="card"><h2>Regions</h2>{table}</div></section>'
    )

    timelines = "".join(
        f'<div class="tl"><h3>{_e(r.region)} <small>{_e(names.get(region_to_insee(r.region) or "", ""))} '
        f"{_e(r.shift or '')}</small></h3>{render_timeline(r)}</div>"
        for r in regions
    )
    body.append(
        '<section class="card"><h2>Drift over time <small>score / threshold per tile (symlog; red band = '
        "alarm; orange = first detection; green = version rolled out)</small></h2>"
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
        + "</main><footer>Departement boundaries: IGN GEOFLA, INSEE, via france-geojson (Etalab Licence Ouverte)."
        "</footer>"
        '<script src="/static/dashboard.js"></script></body></html>'
    )


# -- app + server ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    """What the app answers to one request."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC_TYPES: Final = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class DashboardApp:
    """Routes of the dashboard, independent of the HTTP server (tests call :meth:`handle` directly).

    Args:
        state_path: The state file to show (read again whenever it changes).
        geojson_path: Departement boundaries; default :func:`default_geojson_path`.

    """

    def __init__(self, state_path: Path, geojson_path: Path | None = None) -> None:
        self.state_path = Path(state_path)
        self.geojson_path = Path(geojson_path) if geojson_path else default_geojson_path()
        self._map: DepartementMap | None = None
        self.map_problem: str | None = None
        try:
            self._map = DepartementMap.load(self.geojson_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.map_problem = f"cannot read {self.geojson_path}: {exc}"
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int] | None, DashboardState | None, str | None] | None = None

    @property
    def departements(self) -> DepartementMap | None:
        """The projected boundaries (None when the GeoJSON could not be read)."""
        return self._map

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.state_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> tuple[DashboardState | None, str | None]:
        """The current state and the error that prevented reading it, re-read only when the file changed."""
        stamp = self._stamp()
        with self._lock:
            if self._cache is not None and self._cache[0] == stamp:
                return self._cache[1], self._cache[2]
            try:
                state, error = read_state(self.state_path), None
            except (ValueError, OSError) as exc:
                state, error = None, str(exc)
            self._cache = (stamp, state, error)
            return state, error

    def handle(self, method: str, path: str) -> Response:
        """Answer one request (GET/HEAD only: the dashboard is read-only)."""
        if method not in ("GET", "HEAD"):
            return Response(
                405, "text/plain; charset=utf-8", b"read-only dashboard: GET only\n", (("Allow", "GET, HEAD"),)
            )
        route = path.split("?", 1)[0]
        if route == "/":
            state, error = self.load()
            page = render_page(state, self._map, state_path=self.state_path, error=error, map_problem=self.map_problem)
            return Response(200, "text/html; charset=utf-8", page.encode(), (("Content-Security-Policy", _CSP),))
        if route == "/api/state":
            state, error = self.load()
            if state is None:
                return Response(
                    404 if error is None else 500,
                    "application/json",
                    json.dumps({"error": error or f"no state file at {self.state_path}"}).encode(),
                )
            return Response(200, "application/json", state.model_dump_json().encode())
        if route == "/api/stamp":
            stamp = self._stamp()
            return Response(200, "application/json", json.dumps({"stamp": list(stamp) if stamp else None}).encode())
        if route == "/healthz":
            return Response(200, "text/plain; charset=utf-8", b"ok\n")
        if route.startswith("/static/"):
            name = route.removeprefix("/static/")
            target = STATIC_DIR / name
            if "/" not in name and target.suffix in _STATIC_TYPES and target.is_file():
                return Response(200, _STATIC_TYPES[target.suffix], target.read_bytes())
        return Response(404, "text/plain; charset=utf-8", b"not found\n")


def create_app(state_path: Path, geojson_path: Path | None = None) -> DashboardApp:
    """Build the dashboard for one state file (see :class:`DashboardApp`)."""
    return DashboardApp(state_path, geojson_path)


@dataclass(frozen=True)
class DashboardServer:
    """A running dashboard; ``stop()`` shuts it down."""

    host: str
    port: int
    _server: ThreadingHTTPServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The page's URL."""
        return f"http://{self.host}:{self.port}/"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)


def _handler(app: DashboardApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "terradapt-dashboard"

        def _answer(self, method: str) -> None:
            r = app.handle(method, self.path)
            self.send_response(r.status)
            self.send_header("Content-Type", r.content_type)
            self.send_header("Content-Length", str(len(r.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in r.headers:
                self.send_header(k, v)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(r.body)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_HEAD(self) -> None:
            self._answer("HEAD")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: a polling page would fill the terminal

    return Handler


def serve(app: DashboardApp, host: str = "127.0.0.1", port: int = 0) -> DashboardServer:
    """Serve ``app`` from a daemon thread (``port=0``: any free port, read back from the handle)."""
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="terradapt-dashboard", daemon=True)
    thread.start()
    return DashboardServer(host, int(server.server_address[1]), server, thread)


def run_dashboard(
    state_path: Path, host: str = "127.0.0.1", port: int = 8765, geojson_path: Path | None = None
) -> None:
    """Serve the dashboard until interrupted (what ``terradapt dashboard`` calls).

    Args:
        state_path: State file to show (e.g. ``report/state.json`` written by the demo).
        host: Bind address; loopback by default, the page has no authentication.
        port: TCP port.
        geojson_path: Departement boundaries; default ``$TERRADAPT_DEPARTEMENTS_GEOJSON`` or the shared data.

    """
    app = create_app(state_path, geojson_path)
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    print(f"terradapt dashboard on http://{host}:{server.server_address[1]}/ (state: {state_path}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
