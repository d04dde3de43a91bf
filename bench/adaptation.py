"""Adaptation suite benchmark: every registered method vs source-only and a labelled oracle, per target region.

Writes its section of docs/benchmarks.md (between its markers; other sections are left alone).

Protocol. A source model is trained (and cached under .terradapt/bench/) on source regions: synthetic D033 + D040,
and separately real Dubai areas 1, 2, 7, 8 (leave-areas-out). Targets: held-out synthetic departements D013
(gain/offset + haze), D067 (season + light + blur), D029 (label shift only), D074 (label + mild covariate shift);
Dubai area 2 as is, area 2 under the D013 radiometric shift applied to the real images (``shift_image``), and
areas 4, 5 (real label shift). Each method adapts on a region's stream tiles (batch 1 and 4), then is evaluated
on that region's held-out labelled tiles. The oracle fine-tunes every weight on the stream tiles *with labels*.
Gap closed = (method - source) / (oracle - source). Compute = adaptation time per tile / inference time per tile.
Long stream: one adapter per method cycles through all synthetic targets (no manual reset); after each
region's segment the model is evaluated on that region; the worst window is reported.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

# run as a script, bench/ is first on sys.path and bench/serving.py would shadow the serving package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.registry import adapter_class, available_adapters, create_adapter
from stream.demo import DemoConfig, Scenario, dubai_scenario, source_model
from terradapt.classes import IGNORE_INDEX
from terradapt.datasets.base import Sample
from terradapt.datasets.synthetic import SyntheticDataset
from terradapt.errors import InvalidTileError
from terradapt.model import UNet
from terradapt.raster import RasterSpec
from terradapt.training import evaluate

DOC = Path("docs/benchmarks.md")
START, END = "<!-- bench/adaptation.py:start -->", "<!-- bench/adaptation.py:end -->"
SYN_SOURCES = ("D033", "D040")
SYN_TARGETS = {
    "D013": "gain/offset + haze",
    "D067": "season + light + blur",
    "D029": "label shift only",
    "D074": "label + mild covariate",
}


@dataclass
class RegionResult:
    """One target region: source-only and oracle mIoU, and (mIoU, compute ratio) per "method@batch"."""

    region: str
    shift: str
    source: float
    oracle: float
    methods: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Mode:
    """Sizes of one benchmark mode."""

    tile: int
    train_tiles: int
    train_steps: int
    stream: int
    held_out: int
    oracle_steps: int
    cycles: int
    base_channels: int


QUICK = Mode(
    tile=128, train_tiles=16, train_steps=300, stream=12, held_out=8, oracle_steps=40, cycles=2, base_channels=8
)
# sized from the quick run (5.9 min): ~2.7x the stream tiles, 2x held-out, 2x training, 3 cycles -> about 25 min
FULL = Mode(
    tile=128, train_tiles=32, train_steps=600, stream=32, held_out=16, oracle_steps=120, cycles=3, base_channels=8
)


def synthetic(mode: Mode, seed: int) -> Scenario:
    n = mode.stream + mode.held_out
    counts = {r: mode.train_tiles for r in SYN_SOURCES} | {r: n for r in SYN_TARGETS}
    ds = SyntheticDataset(counts, size=mode.tile, seed=seed)
    rng = np.random.default_rng(seed)

    def load(r: str) -> list[Sample]:
        ids = ds.tile_ids(r)
        return [ds.load(r, ids[i]) for i in rng.permutation(len(ids))]

    sc = Scenario("synthetic", ds.classes, ds.band_names, RasterSpec.flair(), [], [], source_regions=SYN_SOURCES)
    for r in SYN_SOURCES:
        sc.train += load(r)
    for r, shift in SYN_TARGETS.items():
        tiles = load(r)
        sc.streams[r], sc.held_out[r], sc.shift[r] = tiles[: mode.stream], tiles[mode.stream :], shift
    return sc


def dubai(mode: Mode, seed: int) -> Scenario:
    sc = dubai_scenario(DemoConfig(dataset="dubai", tile_size=mode.tile, seed=seed))
    for r in sc.streams:
        sc.streams[r], sc.held_out[r] = sc.streams[r][: mode.stream], sc.held_out[r][: mode.held_out]
    return sc


def tensor(samples: list[Sample]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.image for s in samples])).float()


def score(model: UNet, samples: list[Sample]) -> float:
    return evaluate(model, [s.image for s in samples], [s.mask for s in samples if s.mask is not None]).miou


def oracle(model: UNet, samples: list[Sample], steps: int, seed: int) -> UNet:
    """Fine-tune every weight on the stream tiles with their labels (an upper reference, not a method)."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model).train()
    x = tensor(samples)
    y = torch.from_numpy(np.stack([s.mask for s in samples if s.mask is not None])).long()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (4,))
        loss = F.cross_entropy(m(x[idx]), y[idx], ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return m.eval()


@torch.no_grad()
def inference_seconds(model: UNet, x: torch.Tensor, batch: int) -> float:
    model.eval()
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        model(x[i : i + batch])
    return (time.perf_counter() - t) / len(x)


def run_scenario(sc: Scenario, model: UNet, mode: Mode, seed: int, batches: list[int]) -> list[RegionResult]:
    """Every method at every batch size on every target region of a scenario."""
    rows: list[RegionResult] = []
    src = tensor(sc.train[:: max(1, len(sc.train) // 16)][:16])
    for region, stream in sc.streams.items():
        held = sc.held_out[region]
        x = tensor(stream)
        base = score(model, held)
        orc = score(oracle(model, stream, mode.oracle_steps, seed), held)
        row = RegionResult(region, sc.shift[region], base, orc, {})
        for b in batches:
            infer = inference_seconds(model, x, b)
            for name in available_adapters():
                torch.manual_seed(seed)
                adapter = create_adapter(
                    name, model, source_tiles=src if adapter_class(name).source_replay != "none" else None
                )
                t = time.perf_counter()
                adapted = adapter.adapt(x[i : i + b] for i in range(0, len(x), b))
                cost = (time.perf_counter() - t) / len(x) / infer
                row.methods[f"{name}@{b}"] = (score(adapted, held), cost)
        rows.append(row)
        print(row, flush=True)
    return rows


def long_stream(sc: Scenario, model: UNet, mode: Mode, seed: int) -> dict[str, tuple[float, float]]:
    """Worst and mean window mIoU over ``cycles`` passes through every target, batch 4, no manual reset."""
    order = [r for _ in range(mode.cycles) for r in sc.streams]
    out: dict[str, tuple[float, float]] = {}
    base = [score(model, sc.held_out[r]) for r in order]
    out["source-only"] = (min(base), float(np.mean(base)))
    src = tensor(sc.train[:: max(1, len(sc.train) // 16)][:16])
    for name in available_adapters():
        torch.manual_seed(seed)
        adapter = create_adapter(name, model, source_tiles=src if adapter_class(name).source_replay != "none" else None)
        windows = []
        for r in order:
            x = tensor(sc.streams[r])
            adapted = adapter.adapt(x[i : i + 4] for i in range(0, len(x), 4))
            windows.append(score(adapted, sc.held_out[r]))
        out[name] = (min(windows), float(np.mean(windows)))
    return out


def table(rows: list[RegionResult], batch: int) -> list[str]:
    """Markdown rows: mIoU (delta) per method, then mean / worst delta, gap closed and compute."""
    names = available_adapters()
    head = "| region | shift | source | " + " | ".join(names) + " | oracle |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    gaps: dict[str, list[float]] = {n: [] for n in names}
    deltas: dict[str, list[float]] = {n: [] for n in names}
    for row in rows:
        s, o = row.source, row.oracle
        cells = []
        for n in names:
            m = row.methods[f"{n}@{batch}"][0]
            deltas[n].append(m - s)
            if o - s > 0.01:
                gaps[n].append((m - s) / (o - s))
            cells.append(f"{100 * m:.1f} ({100 * (m - s):+.1f})")
        lines.append(f"| {row.region} | {row.shift} | {100 * s:.1f} | " + " | ".join(cells) + f" | {100 * o:.1f} |")
    lines.append("| **mean delta** | | | " + " | ".join(f"{100 * np.mean(deltas[n]):+.1f}" for n in names) + " | |")
    lines.append("| **worst delta** | | | " + " | ".join(f"{100 * min(deltas[n]):+.1f}" for n in names) + " | |")
    lines.append(
        "| **gap closed (median)** | | | "
        + " | ".join(f"{100 * np.median(gaps[n]):.0f}%" if gaps[n] else "n/a" for n in names)
        + " | |"
    )
    cost = {n: np.mean([row.methods[f"{n}@{batch}"][1] for row in rows]) for n in names}
    lines.append("| **compute / inference** | | | " + " | ".join(f"{cost[n]:.1f}x" for n in names) + " | |")
    return lines


def render(
    args: argparse.Namespace,
    mode: Mode,
    results: dict[str, list[RegionResult]],
    longs: dict[str, tuple[float, float]],
    batches: list[int],
    elapsed: float,
    notes: list[str],
) -> str:
    import os
    import platform

    out = [START, "## Adaptation suite: methods vs source-only and a labelled oracle", ""]
    cmd = "bench/adaptation.py" + (" --quick" if args.quick else "") + ("" if args.dubai else " --no-dubai")
    out.append(f"Command: `.venv/bin/python {cmd}` ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min)")
    out.append("")
    out.append(
        f"Machine: {os.cpu_count()} CPU(s) shared with other jobs, 1 torch thread; Python {platform.python_version()}, "
        f"torch {torch.__version__}. Mode: {'quick' if args.quick else 'full'} ({mode}). One seed ({args.seed}): "
        "differences of a few points are noise."
    )
    out.append("")
    out += [f"Note: {n}" for n in notes]
    out.append("mIoU x 100 on held-out labelled tiles of each target (delta vs source-only in brackets).")
    for label, rows in results.items():
        for b in batches:
            out += ["", f"### {label}, batch {b}", "", *table(rows, b)]
    out += ["", "### Summary over every target region and both batch sizes", ""]
    out += ["| method | mean delta | worst delta | regions worse than source (> 1 pt) |", "|---|---|---|---|"]
    every = [row for rows in results.values() for row in rows]
    for name in available_adapters():
        deltas = [row.methods[f"{name}@{b}"][0] - row.source for row in every for b in batches]
        worse = sum(d < -0.01 for d in deltas)
        out.append(f"| {name} | {100 * np.mean(deltas):+.1f} | {100 * min(deltas):+.1f} | {worse} of {len(deltas)} |")
    out += ["", "### Long stream (synthetic targets cycled, batch 4, no manual reset)", ""]
    out += ["| method | worst window mIoU | mean window mIoU |", "|---|---|---|"]
    for name, (worst, mean) in longs.items():
        out.append(f"| {name} | {100 * worst:.1f} | {100 * mean:.1f} |")
    out += ["", END]
    return "\n".join(out)


def write_section(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# terradapt benchmarks\n\nWritten by the scripts in bench/.\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tiles and streams (minutes on 2 cores)")
    parser.add_argument("--no-dubai", dest="dubai", action="store_false", help="synthetic targets only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mode = QUICK if args.quick else FULL
    batches = [1, 4]
    t0 = time.perf_counter()
    cfg = DemoConfig(
        tile_size=mode.tile,
        train_tiles=mode.train_tiles,
        train_steps=mode.train_steps,
        base_channels=mode.base_channels,
        cache_dir=Path(".terradapt/bench"),
        seed=args.seed,
        device="cpu",
    )
    sc = synthetic(mode, args.seed)
    model, _, _ = source_model(cfg, sc)
    results = {"Synthetic departements": run_scenario(sc, model, mode, args.seed, batches)}
    longs = long_stream(sc, model, mode, args.seed)
    print("long stream (worst, mean):", longs, flush=True)
    notes: list[str] = []
    if args.dubai:
        try:
            dsc = dubai(mode, args.seed)
        except (InvalidTileError, OSError) as err:  # shared data being rewritten, or absent
            notes.append(f"Dubai areas skipped this run: {err}")
        else:
            dcfg = cfg.model_copy(update={"dataset": "dubai"})
            dmodel, _, _ = source_model(dcfg, dsc)
            results["Real Dubai areas (leave-areas-out)"] = run_scenario(dsc, dmodel, mode, args.seed, batches)
    section = render(args, mode, results, longs, batches, time.perf_counter() - t0, notes)
    print(section)
    if not args.no_write:
        write_section(section)


if __name__ == "__main__":
    main()
