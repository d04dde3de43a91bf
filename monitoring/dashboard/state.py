"""The dashboard's input: a JSON *state file* (:class:`DashboardState`) summarising a run, per region.

A runner writes it with :func:`write_state` from :func:`dashboard_state` (the embedded demo writes
``report/state.json``); the page (``monitoring.dashboard.render``) and the server (``monitoring.dashboard.server``)
only read it. The dashboard never imports the pipeline (monitoring sits below stream): it reads the run result
through small structural protocols.

The state also carries the *cross-region review*: Benjamini-Hochberg (``monitoring.fdr.CrossRegionFDR``) over the
regions' latest p-values, i.e. which regions are drifting when all regions are looked at together at a chosen
false-discovery rate (the daily look across departements), next to each region's own calibrated alarm.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field, ValidationError

from monitoring.fdr import CrossRegionFDR, FDRConfig
from terradapt.metrics import miou
from terradapt.records import DeadLetter, ModelVersion, RolloutEvent, RolloutStep, utcnow
from terradapt.settings import StrictModel

STATE_SCHEMA_VERSION: Final = 2

#: Points kept per region timeline: the state file stays small however long the stream runs.
TIMELINE_POINTS: Final = 400

_DEPARTEMENT = re.compile(r"^D0(?P<code>[0-9]{2}|2[AB])$")


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


# -- state file ------------------------------------------------------------------------------------------------
class TimelinePoint(StrictModel):
    """One tile of a region's stream as the monitor saw it."""

    index: int
    ratio: float
    version: int
    fired: tuple[str, ...] = ()
    acquired: datetime | None = None  # the tile's capture time, when its acquisition item tells it


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
    p_value: float | None = Field(default=None, description="latest p-value of the region (signals combined)")
    fdr_flagged: bool = Field(default=False, description="drifting at the cross-region review's FDR level")


class DashboardState(StrictModel):
    """The dashboard's input file (``state.json``), versioned so an old page refuses a newer file."""

    schema_version: int = STATE_SCHEMA_VERSION
    title: str = "terradapt"
    generated_at: datetime = Field(default_factory=utcnow)
    regions: dict[str, RegionState] = Field(default_factory=dict)
    dead_letters: dict[str, int] = Field(default_factory=dict)
    drift_events: int = 0
    fdr_q: float = Field(default=0.05, description="false-discovery rate of the cross-region review")
    fdr_flagged: tuple[str, ...] = Field(default=(), description="regions flagged by the cross-region review")


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
    @property
    def p_value(self) -> float: ...


class RunLike(Protocol):
    """What the dashboard reads of a ``stream.embedded.RunResult`` (structural: no import of the stream layer)."""

    @property
    def tiles(self) -> Sequence[_TileLike]: ...
    @property
    def drift_events(self) -> Sequence[object]: ...
    @property
    def adaptations(self) -> Sequence[ModelVersion]: ...
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
    fdr: FDRConfig | None = None,
) -> DashboardState:
    """Summarise a run (finished or in progress) into the dashboard's state.

    Args:
        result: The runner's result (``RunResult``); may be read while the run goes on.
        registry: Source of truth for the version each region serves; without it, the last promotion or
            rollback of the run, else the version of the region's last tile.
        rows: Held-out evaluation rows (the demo's ``RegionRow``), shown as source -> current mIoU.
        title: Page title.
        fdr: The cross-region review's level (default q = 0.05, PRDS): Benjamini-Hochberg over every region's
            latest p-value, one look at all regions together.

    Returns:
        The state to hand to :func:`write_state`.

    """
    by_region: dict[str, list[_TileLike]] = {}
    for t in result.tiles:
        by_region.setdefault(t.region, []).append(t)
    regions = set(by_region) | {r.region for r in result.rollouts} | {a.region for a in result.adaptations}
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
                TimelinePoint(
                    index=t.index,
                    ratio=_finite(t.score_ratio),
                    version=t.version,
                    fired=tuple(t.fired),
                    acquired=getattr(t, "acquired", None),  # runners that know no capture time leave it out
                )
                for t in tiles[-TIMELINE_POINTS:]
            ],
            accuracy=[_version_accuracy(v, cm) for (r, v), cm in sorted(result.confusion.items()) if r == region],
            held_out_miou=_held_out(row_of.get(region)),
            rollouts=[_rollout_mark(e, tiles) for e in rollouts],
            adaptations=[
                AdaptationMark(
                    version=a.version, parent=a.parent, method=a.method, accepted=a.accepted, reasons=a.gate_reasons
                )
                for a in result.adaptations
                if a.region == region
            ],
            p_value=None if last is None else _finite(last.p_value),
        )
    review = CrossRegionFDR(fdr)
    flagged = review.step({r: s.p_value for r, s in out.items() if s.p_value is not None})
    for r in flagged:
        out[r] = out[r].model_copy(update={"fdr_flagged": True})
    return DashboardState(
        title=title,
        regions=out,
        dead_letters=dict(Counter(d.reason for d in result.dead_letters)),
        drift_events=len(result.drift_events),
        fdr_q=review.config.q,
        fdr_flagged=tuple(sorted(flagged)),
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
