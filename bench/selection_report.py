"""Selection benchmark, report: the summary against the issue's targets, the tables, the docs section.

See bench/selection.py (the entry point) for the whole protocol.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.selection_data import (
    BATCHES,
    FULL,
    QUICK,
    REPORT_AREAS,
    REPORT_SHIFTS,
    ROLLING,
    SHOTS,
    SYSTEM_BATCH,
    SYSTEM_METHOD,
    TUNING_DEPARTEMENTS,
    TUNING_FAMILIES,
    WORSE,
    Mode,
    avg,
)
from bench.selection_runs import Block, DomainResult, FewShot, LongStream, Stopwatch, label_free_methods, rolling_worst


# -- summary (the targets) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """Means over a set's domains (fractions) and the issue's targets."""

    domains: int
    source: float
    system: float
    bn: float
    default: float  # the system's default method alone (SYSTEM_METHOD at SYSTEM_BATCH), in every domain
    chooser: float
    oracle: float
    selected: float
    unshifted_source: float
    unshifted_system: float
    shifted_source: float
    shifted_system: float
    worse: tuple[str, ...]  # regions where the system is more than WORSE below source-only

    def targets(self) -> dict[str, bool]:
        return {
            "system mean >= perfect chooser": self.system >= self.chooser - 1e-12,
            "unshifted mean not below source-only": self.unshifted_system >= self.unshifted_source - 1e-12,
            f"<= 1 of {self.domains} domains worse than source by > {100 * WORSE:.1f}": len(self.worse) <= 1,
        }


def summarise(rows: Sequence[DomainResult]) -> Summary:
    """The summary lines of a table of domains."""
    plain = [r for r in rows if not r.domain.shifted]
    moved = [r for r in rows if r.domain.shifted]
    return Summary(
        domains=len(rows),
        source=avg([r.source for r in rows]),
        system=avg([r.system for r in rows]),
        bn=avg([r.bn for r in rows]),
        default=avg([r.methods[f"{SYSTEM_METHOD}@{SYSTEM_BATCH}"][0] for r in rows]),
        chooser=avg([r.chooser for r in rows]),
        oracle=avg([r.oracle for r in rows]),
        selected=avg([r.selected[1] for r in rows]),
        unshifted_source=avg([r.source for r in plain]),
        unshifted_system=avg([r.system for r in plain]),
        shifted_source=avg([r.source for r in moved]),
        shifted_system=avg([r.system for r in moved]),
        worse=tuple(r.domain.region for r in rows if not r.system >= r.source - WORSE),
    )


# -- rendering -------------------------------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _delta(v: float, ref: float) -> str:
    return f"{100 * v:.1f} ({100 * (v - ref):+.1f})"


def domain_table(rows: Sequence[DomainResult], batch: int) -> list[str]:
    names = label_free_methods()
    head = "| domain | area | shift | source | terradapt | " + " | ".join(names)
    head += " | perfect chooser | estimator's choice | oracle | estimate MAE |"
    lines = [head, "|" + "---|" * (len(names) + 9)]
    for r in rows:
        d = r.domain
        picked, m = r.selected
        cells = [_delta(r.methods[f"{n}@{batch}"][0], r.source) for n in names]
        lines.append(
            f"| {d.region} | {d.area} | {d.shift} | {_pct(r.source)} | {_delta(r.system, r.source)} | "
            + " | ".join(cells)
            + f" | {_pct(r.chooser)} | {_delta(m, r.source)} {picked} | {_pct(r.oracle)} | {_pct(r.estimate_error())} |"
        )
    mean = [avg([r.methods[f"{n}@{batch}"][0] - r.source for r in rows]) for n in names]
    lines.append(
        f"| **mean delta** | | | | {100 * avg([r.system - r.source for r in rows]):+.1f} | "
        + " | ".join(f"{100 * v:+.1f}" for v in mean)
        + f" | {100 * avg([r.chooser - r.source for r in rows]):+.1f} "
        f"| {100 * avg([r.selected[1] - r.source for r in rows]):+.1f} "
        f"| {100 * avg([r.oracle - r.source for r in rows]):+.1f} | |"
    )
    cost = [avg([r.methods[f"{n}@{batch}"][1] for r in rows]) for n in names]
    lines.append(
        f"| **compute / inference** | | | | {avg([r.system_cost for r in rows]):.1f}x | "
        + " | ".join(f"{c:.1f}x" for c in cost)
        + " | | | | |"
    )
    return lines


def estimate_table(rows: Sequence[DomainResult]) -> list[str]:
    names = label_free_methods()
    head = "| domain | shift | " + " | ".join(names) + " | MAE (calibrated methods) | MAE (all) |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for r in rows:
        cells = []
        for n in names:
            e, t = r.estimates[f"{n}@{SYSTEM_BATCH}"]
            cells.append(f"{100 * e:+.1f} / {100 * t:+.1f}")
        lines.append(
            f"| {r.domain.region} | {r.domain.shift} | "
            + " | ".join(cells)
            + f" | {_pct(r.estimate_error())} | {_pct(r.estimate_error(every=True))} |"
        )
    per = [avg([abs(e - t) for r in rows for c, (e, t) in r.estimates.items() if c.startswith(f"{n}@")]) for n in names]
    lines.append("| **MAE (both batches)** | | " + " | ".join(_pct(v) for v in per) + " | | |")
    return lines


def summary_lines(s: Summary, label: str) -> list[str]:
    out = [
        f"| mean mIoU over {s.domains} domains ({label}) | source-only | terradapt | bn alone "
        f"| {SYSTEM_METHOD} alone (the system's method) | perfect chooser | estimator's choice | oracle |",
        "|---|---|---|---|---|---|---|---|",
        f"| all | {_pct(s.source)} | {_pct(s.system)} | {_pct(s.bn)} | {_pct(s.default)} | {_pct(s.chooser)} "
        f"| {_pct(s.selected)} | {_pct(s.oracle)} |",
        f"| unshifted | {_pct(s.unshifted_source)} | {_pct(s.unshifted_system)} | | | | | |",
        f"| shifted | {_pct(s.shifted_source)} | {_pct(s.shifted_system)} | | | | | |",
        "",
        f"Domains where terradapt ends more than {100 * WORSE:.1f} points below source-only: {len(s.worse)} of "
        f"{s.domains}" + (f" ({', '.join(s.worse)})." if s.worse else "."),
        "",
        "| target | met |",
        "|---|---|",
    ]
    out += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in s.targets().items()]
    return out


def losses(rows: Sequence[DomainResult]) -> list[str]:
    """Where terradapt loses: below source-only, or below the perfect chooser, by more than 0.5 points."""
    out = []
    for r in rows:
        if r.system < r.source - WORSE or r.system < r.chooser - WORSE:
            what = "below source-only" if r.system < r.source - WORSE else "below the perfect chooser"
            out.append(
                f"- {r.domain.region} ({r.domain.shift}): {what}: terradapt {_pct(r.system)}, source {_pct(r.source)}, "
                f"bn {_pct(r.bn)}, oracle {_pct(r.oracle)}; the system: {r.decision}"
            )
    return out or ["- nowhere by more than 0.5 points."]


def mode_name(mode: Mode) -> str:
    return "quick" if mode == QUICK else "full" if mode == FULL else "custom"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(
    command: str,
    mode: Mode,
    tune: bool,
    blocks: Sequence[Block],
    fewshot: FewShot | None,
    longs: LongStream,
    elapsed: float,
    clock: Stopwatch,
) -> str:
    which = "TUNING" if tune else "REPORT"
    out = ["## Selection: when and how much to adapt, on areas and shifts never tuned on (issue 12)", ""]
    out.append(f"Command: `{command}` ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min: {clock.line()})")
    out.append("")
    out.append(
        f"Machine: {os.cpu_count()} CPU(s) ({cpu_model()}) shared with other jobs, 1 torch thread; Python "
        f"{platform.python_version()}, torch {torch.__version__}. Mode: {mode_name(mode)} "
        f"({mode}). One seed: differences of a few points are noise."
    )
    out.append("")
    out.append(
        f"**Every table in this section is on the {which} set.** Tuning set (defaults may be chosen on it): held-out "
        "tiles of the source areas 1, 2, 7, 8 as is and under the selection estimator's calibration families "
        f"({', '.join(TUNING_FAMILIES)}), and the synthetic departements {', '.join(TUNING_DEPARTEMENTS)}. Report "
        f"set (only looked at to report): unseen areas {', '.join(map(str, REPORT_AREAS))} as is and under "
        f"{', '.join(REPORT_SHIFTS)} (families in no tuning set). `--tune` prints the same tables on the tuning set."
    )
    if mode.per_area < 4:
        out += ["", f"Note: this mode runs {mode.per_area} domains per area (as is + one family in turn), not 4."]
    out += [
        "",
        "mIoU x 100 on each domain's held-out labelled tiles (delta vs source-only in brackets). terradapt = the "
        f"embedded runner with the default settings (adaptation batch {SYSTEM_BATCH}); perfect chooser = max(source, "
        f"bn@{SYSTEM_BATCH}); estimator's choice = the candidate (method@batch) with the best label-free estimate "
        "above its margin among the methods the estimator is calibrated for, else source-only; estimate MAE = mean "
        "|estimated - true mIoU change| over the domain's candidates of those methods. terradapt's compute is the "
        "whole loop per streamed tile, the registry bootstrap (monitor and selection calibration) included. "
        "Oracle = a labelled upper reference, not a method: `adapters.fewshot.few_shot_adapt` from the source model "
        "with every stream tile's label (BatchNorm statistics re-estimated on the stream, then "
        f"{mode.oracle_steps} L2-SP-anchored fine-tuning steps).",
    ]
    for block in blocks:
        s = summarise(block.rows)
        out += ["", f"### {block.label}: summary", "", *summary_lines(s, which.lower())]
        out += ["", f"### {block.label}: where terradapt loses", "", *losses(block.rows)]
        out += ["", f"### {block.label}: what terradapt did", "", "| domain | decision |", "|---|---|"]
        out += [f"| {r.domain.region} | {r.decision} |" for r in block.rows]
        for b in BATCHES:
            out += ["", f"### {block.label}: methods at batch {b}", "", *domain_table(block.rows, b)]
        rows = block.rows
        calibrated = rows[0].calibrated if rows else ()
        mae = avg([abs(e - t) for r in rows for c, (e, t) in r.estimates.items() if r.in_calibration(c)])
        mae_all = avg([abs(e - t) for r in rows for e, t in r.estimates.values()])
        out += [
            "",
            f"### {block.label}: label-free selection estimate vs true mIoU change (batch {SYSTEM_BATCH}, x 100)",
            "",
            "Each cell: estimated / true change of mIoU over source-only. The estimator (`adapters.selection`) was "
            f"calibrated with {', '.join(calibrated)} on the source calibration tiles under the tuning families. "
            f"Mean absolute error over every candidate of those methods and every domain: {_pct(mae)} points; "
            f"over every candidate: {_pct(mae_all)}; on its own calibration domains: {_pct(block.calibration_mae)}; "
            "shipping margins "
            + ", ".join(f"{m} {_pct(v)}" for m, v in block.margins.items())
            + " (a method without its own estimator gets the pooled fit).",
            "",
            *estimate_table(rows),
        ]
    if fewshot is not None:
        first = [r for r in blocks[0].rows if r.domain.region in fewshot.regions]
        src, orc = avg([r.source for r in first]), avg([r.oracle for r in first])
        out += ["", f"### Few-shot curve ({blocks[0].label}, mean mIoU, % of the ERM source -> oracle gap)", ""]
        out.append(
            f"Domains: {', '.join(fewshot.regions)}. K labelled tiles = the first K of the domain's stream, the rest "
            "of the stream unlabelled (`adapters.fewshot.few_shot_adapt`, "
            f"{mode.fewshot_steps} steps); K=0 is its unlabelled term alone (BatchNorm statistics re-estimated on "
            f"the stream). ERM source-only {_pct(src)}, labelled oracle {_pct(orc)} on these domains; "
            "source-only column: each protocol's source model, no adaptation."
        )
        out += ["", "| protocol | source-only | " + " | ".join(f"K={k}" for k in SHOTS) + " |"]
        out.append("|" + "---|" * (len(SHOTS) + 2))
        gap = orc - src
        for p, curve in fewshot.shots.items():
            cells = [f"{_pct(v)} ({100 * (v - src) / gap:.0f}%)" if gap > 1e-9 else _pct(v) for v in curve.values()]
            out.append(f"| {p} | {_pct(fewshot.source[p])} | " + " | ".join(cells) + " |")
        if gap <= 1e-9:
            out += ["", "The oracle is not above source-only on these domains: no gap to close, none shown."]
        n = len(blocks[0].rows)
        out += ["", f"Source-only mIoU of each protocol's source model over all {n} domains of the set:", ""]
        out += ["| protocol | all | unshifted | shifted |", "|---|---|---|---|"]
        for p, (a, u, sh) in fewshot.source_all.items():
            out.append(f"| {p} | {_pct(a)} | {_pct(u)} | {_pct(sh)} |")
    worst_window = rolling_worst(longs.system, longs.source, ROLLING)
    d = [a - b for a, b in zip(longs.system, longs.source, strict=True)]
    worst_at = int(np.argmin(d))
    out += [
        "",
        f"### Long stream ({blocks[0].label}: {mode.cycles} cycles, {len(longs.regions)} segments as one region)",
        "",
        "| source-only mean | terradapt mean | worst segment delta | worst rolling window delta "
        f"({ROLLING} segments) | never below source (rolling) |",
        "|---|---|---|---|---|",
        f"| {_pct(avg(longs.source))} | {_pct(avg(longs.system))} | {100 * min(d):+.1f} | "
        f"{100 * worst_window:+.1f} | {'yes' if worst_window >= -WORSE else '**no**'} |",
        "",
        f"Worst segment: {longs.regions[worst_at]} (segment {worst_at + 1} of {len(d)}): terradapt "
        f"{_pct(longs.system[worst_at])}, source-only {_pct(longs.source[worst_at])}.",
    ]
    return "\n".join(out)
