"""The embedded run's report: a self-contained HTML page with PNG plots (drift timelines, mIoU before/after)."""

from __future__ import annotations

import base64
import html
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from stream.embedded import RunResult


@dataclass(frozen=True)
class RegionRow:
    """One line of the per-region table."""

    region: str
    shift: str
    tiles: int
    drift_at: int | None
    signal: str
    version: int
    gate: str
    miou_source: float | None
    miou_current: float | None


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def drift_plot(result: RunResult, regions: list[str]) -> bytes:
    """Drift score / threshold per tile for each region, with detection and rollout marked."""
    fig, axes = plt.subplots(len(regions), 1, figsize=(9, 1.9 * len(regions)), sharex=True, squeeze=False)
    for ax, region in zip(axes[:, 0], regions, strict=True):
        logs = [t for t in result.tiles if t.region == region]
        x = [t.index for t in logs]
        ax.plot(x, [t.score_ratio for t in logs], lw=1.4, color="#1f77b4", label="max score / threshold")
        ax.axhline(1.0, color="#d62728", ls="--", lw=1, label="calibrated threshold")
        det = result.first_detection.get(region)
        if det is not None:
            ax.axvline(det, color="#ff7f0e", lw=1.5, label=f"drift detected (tile {det})")
        for t_prev, t in itertools.pairwise(logs):
            if t.version != t_prev.version:
                ax.axvline(t.index, color="#2ca02c", lw=1.5, label=f"v{t.version} deployed")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel(region)
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("tile index in the region's stream")
    fig.suptitle("Drift score over time (ratio to the calibrated threshold; >1 = alarm)")
    return _png(fig)


def miou_plot(rows: list[RegionRow]) -> bytes:
    """Grouped bars: source model vs region's current model, mIoU on the region's labelled tiles."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * (r.miou_source or 0) for r in rows], 0.4, label="source model")
    ax.bar([x + 0.2 for x in xs], [100 * (r.miou_current or 0) for r in rows], 0.4, label="region's model")
    ax.set_xticks(list(xs), [f"{r.region}\n{r.shift}" for r in rows], fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.legend()
    ax.set_title("mIoU per region: source model vs the version each region ends with")
    return _png(fig)


def write_report(directory: Path, result: RunResult, rows: list[RegionRow], title: str) -> Path:
    """Write ``index.html`` (images embedded) and the PNGs into ``directory``; return the HTML path."""
    directory.mkdir(parents=True, exist_ok=True)
    drift = drift_plot(result, [r.region for r in rows])
    bars = miou_plot(rows)
    (directory / "drift.png").write_bytes(drift)
    (directory / "miou.png").write_bytes(bars)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    body = "".join(
        f"<tr><td>{html.escape(r.region)}</td><td>{html.escape(r.shift)}</td><td>{r.tiles}</td>"
        f"<td>{r.drift_at if r.drift_at is not None else 'no'}</td><td>{html.escape(r.signal)}</td>"
        f"<td>v{r.version}</td><td>{html.escape(r.gate)}</td>"
        f"<td>{pct(r.miou_source)}</td><td>{pct(r.miou_current)}</td></tr>"
        for r in rows
    )
    b64 = {name: base64.b64encode(data).decode() for name, data in (("drift", drift), ("miou", bars))}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1>
<table><tr><th>region</th><th>shift</th><th>tiles</th><th>drift at tile</th><th>signal</th><th>model</th>
<th>gate</th><th>mIoU source</th><th>mIoU region model</th></tr>{body}</table>
<p>Dead letters: {len(result.dead_letters)}. Adaptations: {len(result.adaptations)}.
Rollouts: {len(result.rollouts)}.</p>
<h2>Drift over time</h2><img alt="drift timelines" src="data:image/png;base64,{b64["drift"]}">
<h2>Accuracy before and after</h2><img alt="mIoU per region" src="data:image/png;base64,{b64["miou"]}">
</body></html>"""
    path = directory / "index.html"
    path.write_text(page)
    return path
