"""Drift detectors side by side: every terradapt detector and River's ADWIN/KSWIN, same features, same streams.

    .venv/bin/python bench/drift.py [--quick] [--reps N] [--skip-dubai]

Features (``TileFeatures``) are computed once per configuration with a small source model trained by
``stream.demo`` and cached under .terradapt/bench/. Streams are drawn from those feature pools (tiles resampled
with replacement, one seed per replicate):

* synthetic FLAIR-style departements (source = D033 + D040; the in-distribution pool is held-out source tiles
  never used for calibration): abrupt switch to D013 (gain/offset + haze), seasonal switch to D067 (season,
  illumination, blur), gradual drift to D067 (the probability of a D067 tile ramps from 0 to 1 over half the
  post-change segment), label shift only (D029), and a long no-shift stream;
* real Dubai aerial areas (source = areas 1, 7, 8; areas 2 and 4 are left out because their masks do not load):
  held-out source patches -> area 5 (an area switch: more water), and held-out source patches -> the same
  patches under haze + gain applied to the real images (``terradapt.datasets.synthetic.shift_image``).

Every terradapt row is a ``RegionMonitor`` (four signals, Bonferroni ERT split, monitor ERT 1000 tiles) with the
named detector on every signal; "suite" maps each signal to the detector built for it. River rows run one
detector per signal on the same per-tile scalar (mean squared z-score of the signal's features against the
source calibration tiles) and alarm when any fires; their per-check levels are set to 1/(4 ERT)
(KSWIN ``alpha``, ADWIN ``delta``), the nearest analogue of the ERT split (they have no ERT calibration).
alibi-detect is not run: every release pins numpy<2 (0.13.0: ``numpy<2.0.0,>=1.16.2`` and ``numba<0.60``), and
this project is on numpy 2.x (see docs/benchmarks.md).

Metrics: detection delay (tiles after the change point to the first alarm, mean over detected replicates),
missed (replicates with no alarm in the post-change segment), false alarms per 1000 in-distribution tiles (all
pre-change tiles and the no-shift streams; the monitor is reset after each false alarm), and state memory
(bytes of the JSON ``state_dict``; River: bytes of the pickled detectors, they have no state_dict).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitoring.features import TileFeatures, forward_with_features  # noqa: E402
from monitoring.monitor import SIGNALS, MonitorConfig, RegionMonitor  # noqa: E402
from stream.demo import DemoConfig, Scenario, source_model, synthetic_scenario  # noqa: E402
from terradapt.datasets.base import Sample, iter_patches  # noqa: E402
from terradapt.datasets.dubai import DubaiDataset  # noqa: E402
from terradapt.datasets.synthetic import DEPARTEMENTS, shift_image  # noqa: E402
from terradapt.raster import RasterSpec  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench/drift.py:start -->", "<!-- bench/drift.py:end -->"
CACHE = ROOT / ".terradapt" / "bench"
ERT = 1000
DETECTORS = ["mean-shift", "band-quantile", "kernel-mmd", "bn-distance", "prediction"]
SUITE = {
    "radiometry": {"detector": "band-quantile"},
    "deep": {"detector": "kernel-mmd"},
    "batchnorm": {"detector": "bn-distance"},
    "prediction": {"detector": "prediction"},
}
Pools = dict[str, list[TileFeatures]]


# ----------------------------------------------------------------------------------------------- features
def _to_dict(f: TileFeatures) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(f).items()}


def _from_dict(d: dict[str, Any]) -> TileFeatures:
    return TileFeatures(**{k: (np.asarray(v) if isinstance(v, list) else v) for k, v in d.items()})


def _featurize(model: torch.nn.Module, samples: Sequence[Sample], batch: int = 8) -> list[TileFeatures]:
    out: list[TileFeatures] = []
    for i in range(0, len(samples), batch):
        arr = np.stack([s.image for s in samples[i : i + batch]])
        out += forward_with_features(model, torch.from_numpy(arr).float(), arr).features  # type: ignore[arg-type]
    return out


def _cached(key: dict[str, Any], build: Callable[[], Pools]) -> Pools:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"features-{key['dataset']}-{digest}.json"
    if path.exists():
        return {k: [_from_dict(d) for d in v] for k, v in json.loads(path.read_text()).items()}
    pools = build()
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: [_to_dict(f) for f in v] for k, v in pools.items()}))
    return pools


def synthetic_pools(quick: bool) -> Pools:
    """Calibration, in-distribution and target feature pools of the synthetic departements."""
    cfg = DemoConfig(
        tile_size=128,
        train_tiles=12,
        train_steps=120,
        calibration_tiles=160 if quick else 320,
        stream_tiles=80 if quick else 160,
        eval_tiles=1,
        cache_dir=CACHE / "models",
    )

    def build() -> Pools:
        sc = synthetic_scenario(cfg)
        model, _, _ = source_model(cfg, sc)
        cal = list(sc.calibration)
        order = np.random.default_rng(1).permutation(len(cal))
        half = len(cal) // 2
        pools = {
            "calibration": _featurize(model, [cal[i] for i in order[:half]]),
            "in": _featurize(model, [cal[i] for i in order[half:]]),
        }
        for region in ("D013", "D067", "D029"):
            pools[region] = _featurize(model, sc.streams[region])
        return pools

    return _cached({"dataset": "synthetic", "quick": quick, "cfg": cfg.model_dump(mode="json")}, build)


#: Dubai areas whose masks load (areas 2 and 4 ship 1-band masks that DubaiDataset rejects: see the report)
DUBAI_SOURCES = ("dubai-1", "dubai-7", "dubai-8")


def _dubai_patches(ds: DubaiDataset, region: str, size: int, rng: np.random.Generator) -> list[Sample]:
    out: list[Sample] = []
    for t in ds.tile_ids(region):
        out.extend(iter_patches(ds.load(region, t), size))
    return [out[i] for i in rng.permutation(len(out))]


def dubai_pools(quick: bool) -> Pools:
    """Feature pools of real Dubai areas: held-out source patches, area 5, source patches under haze + gain."""
    cfg = DemoConfig(dataset="dubai", tile_size=128, train_steps=120, cache_dir=CACHE / "models")

    def build() -> Pools:
        ds, rng = DubaiDataset(), np.random.default_rng(0)
        sc = Scenario("dubai bench", ds.classes, ds.band_names, RasterSpec(band_count=3, require_crs=False), [], [])
        sc.source_regions = DUBAI_SOURCES
        held: list[Sample] = []
        for r in DUBAI_SOURCES:
            tiles = _dubai_patches(ds, r, cfg.tile_size, rng)
            n_train = int(len(tiles) * 0.6)
            sc.train += tiles[:n_train]
            rest = tiles[n_train:]
            sc.calibration += rest[: len(rest) // 2]
            held += rest[len(rest) // 2 :]
        model, _, _ = source_model(cfg, sc)
        cap = 200 if quick else 400
        hazy = [
            Sample(shift_image(s.image, DEPARTEMENTS["D013"], rng), s.mask, "hazy", s.tile_id, s.crs, s.transform)
            for s in held
        ]
        return {
            "calibration": _featurize(model, sc.calibration[:cap]),
            "in": _featurize(model, held[:cap]),
            "dubai-5": _featurize(model, _dubai_patches(ds, "dubai-5", cfg.tile_size, rng)[:cap]),
            "hazy": _featurize(model, hazy[:cap]),
        }

    return _cached({"dataset": "dubai", "quick": quick, "cfg": cfg.model_dump(mode="json"), "v": 2}, build)


# ----------------------------------------------------------------------------------------------- streams
@dataclass
class Stream:
    """One replicate: tiles, and the index of the change point (None: no change)."""

    tiles: list[TileFeatures]
    change: int | None


def _draw(pool: list[TileFeatures], n: int, rng: np.random.Generator) -> list[TileFeatures]:
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


def scenarios(syn: Pools, dub: Pools | None, reps: int, pre: int, post: int, long: int) -> dict[str, list[Stream]]:
    """Every scenario's replicates (seeded)."""
    out: dict[str, list[Stream]] = {}

    def switch(name: str, pools: Pools, target: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        out[name] = [Stream(_draw(pools["in"], pre, rng) + _draw(pools[target], post, rng), pre) for _ in range(reps)]

    switch("abrupt: D013 gain+haze", syn, "D013", 1)
    switch("seasonal: D067", syn, "D067", 2)
    rng = np.random.default_rng(3)
    gradual = []
    for _ in range(reps):
        tiles = _draw(syn["in"], pre, rng)
        for i in range(post):
            src = "D067" if rng.uniform() < min(1.0, i / (post / 2)) else "in"
            tiles += _draw(syn[src], 1, rng)
        gradual.append(Stream(tiles, pre))
    out["gradual: D067 ramp"] = gradual
    switch("label shift only: D029", syn, "D029", 4)
    rng = np.random.default_rng(5)
    out["no shift (synthetic)"] = [Stream(_draw(syn["in"], long, rng), None) for _ in range(max(reps // 4, 2))]
    if dub is not None:
        switch("Dubai areas 1/7/8 -> area 5", dub, "dubai-5", 6)
        switch("Dubai -> haze+gain (real images)", dub, "hazy", 7)
    return out


# ----------------------------------------------------------------------------------------------- methods
class Method:
    """A detector setup: calibrate once, then a fresh copy per replicate."""

    name = ""

    def calibrate(self, cal: list[TileFeatures]) -> None:
        raise NotImplementedError

    def fresh(self) -> Callable[[TileFeatures], bool]:
        """A new calibrated detector: feed a tile, get whether it alarms now."""
        raise NotImplementedError

    def memory(self) -> int:
        raise NotImplementedError


class TerradaptMethod(Method):
    def __init__(self, name: str, config: MonitorConfig) -> None:
        self.name, self.config = name, config
        self.state: dict[str, Any] = {}
        self._bytes = 0

    def calibrate(self, cal: list[TileFeatures]) -> None:
        mon = RegionMonitor(self.config)
        half = len(cal) // 2
        mon.calibrate(cal[:half], cal[half:], seed=0)
        self.state = json.loads(json.dumps(mon.state_dict()))

    def fresh(self) -> Callable[[TileFeatures], bool]:
        mon = RegionMonitor()
        mon.load_state_dict(self.state)

        def step(f: TileFeatures) -> bool:
            alarm = bool(mon.update(f).fired)
            if alarm:
                self._bytes = max(self._bytes, len(json.dumps(mon.state_dict())))
                mon.reset()
            return alarm

        self._mon = mon
        return step

    def memory(self) -> int:
        return max(self._bytes, len(json.dumps(self._mon.state_dict())))


class RiverMethod(Method):
    """River detectors on per-signal scalars (mean squared z-score against the calibration tiles)."""

    def __init__(self, kind: str) -> None:
        self.name, self.kind = f"river {kind}", kind
        self.norm: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = {}
        self._seed = 0

    def calibrate(self, cal: list[TileFeatures]) -> None:
        for s, (extract, _) in SIGNALS.items():
            x = np.stack([extract(f) for f in cal])
            self.norm[s] = (x.mean(axis=0), np.where(x.std(axis=0) > 1e-9, x.std(axis=0), 1.0))

    def _make(self) -> dict[str, Any]:
        from river.drift import ADWIN, KSWIN

        level = 1.0 / (len(SIGNALS) * ERT)
        self._seed += 1
        if self.kind == "ADWIN":
            return {s: ADWIN(delta=level) for s in SIGNALS}
        return {s: KSWIN(alpha=level, window_size=100, stat_size=30, seed=self._seed) for s in SIGNALS}

    def fresh(self) -> Callable[[TileFeatures], bool]:
        box = {"dets": self._make()}

        def step(f: TileFeatures) -> bool:
            alarm = False
            for s, det in box["dets"].items():
                mean, std = self.norm[s]
                det.update(float(np.mean(np.square((SIGNALS[s][0](f) - mean) / std))))
                alarm = alarm or bool(det.drift_detected)
            if alarm:
                box["dets"] = self._make()
            return alarm

        self._box = box
        return step

    def memory(self) -> int:
        return len(pickle.dumps(self._box["dets"]))


# ----------------------------------------------------------------------------------------------- run
@dataclass
class Row:
    """Metrics of one method on one scenario."""

    delays: list[int] = field(default_factory=list)
    missed: int = 0
    false_alarms: int = 0
    in_tiles: int = 0


def run_method(method: Method, streams: dict[str, list[Stream]]) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for name, reps in streams.items():
        row = rows.setdefault(name, Row())
        for st in reps:
            step = method.fresh()
            end = len(st.tiles) if st.change is None else st.change
            detected = None
            for t, f in enumerate(st.tiles):
                alarm = step(f)
                if t < end:
                    row.in_tiles += 1
                    row.false_alarms += alarm
                elif alarm:
                    detected = t - end
                    break
            if st.change is not None:
                if detected is None:
                    row.missed += 1
                else:
                    row.delays.append(detected)
    return rows


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU(s), {cpu}; Python {platform.python_version()}, torch {torch.__version__} "
        f"(1 thread), numpy {np.__version__}; load average at the end {load}"
    )


def _table(results: dict[str, dict[str, Row]], memory: dict[str, int], reps: dict[str, int]) -> str:
    scen = list(next(iter(results.values())))
    change = [s for s in scen if not s.startswith("no shift")]
    head = "| method | " + " | ".join(change) + " | FA / 1000 in-dist. tiles | state bytes |"
    sep = "|---" * (len(change) + 3) + "|"
    lines = [head, sep]
    for m, rows in results.items():
        cells = []
        for s in change:
            r = rows[s]
            d = f"{np.mean(r.delays):.1f}" if r.delays else "-"
            cells.append(f"{d} ({r.missed}/{reps[s]} missed)")
        fa = sum(r.false_alarms for r in rows.values())
        n = sum(r.in_tiles for r in rows.values())
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {1000 * fa / max(n, 1):.2f} | {memory[m]:,} |")
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# terradapt benchmarks\n\nWritten by the scripts in bench/.\n"
    block = f"{START}\n{section.rstrip()}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tiles and replicates (a few minutes)")
    ap.add_argument("--reps", type=int, default=None, help="replicates per change scenario")
    ap.add_argument("--skip-dubai", action="store_true", help="leave out the real Dubai areas")
    ap.add_argument("--no-doc", action="store_true", help="print the table, do not rewrite docs/benchmarks.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    reps = args.reps or (8 if args.quick else 24)
    pre, post, long = (100, 100, 1000) if args.quick else (200, 150, 2000)
    syn = synthetic_pools(args.quick)
    dub = None if args.skip_dubai else dubai_pools(args.quick)
    print(f"features ready in {time.time() - t0:.0f} s: " + ", ".join(f"{k}={len(v)}" for k, v in syn.items()))
    streams = scenarios(syn, dub, reps, pre, post, long)
    methods: list[tuple[Method, str]] = []
    for name in DETECTORS:
        methods.append((TerradaptMethod(f"terradapt {name}", MonitorConfig(detector=name, ert=ERT)), "syn"))
    methods.append((TerradaptMethod("terradapt suite", MonitorConfig(per_signal=SUITE, ert=ERT)), "syn"))
    methods += [(RiverMethod("ADWIN"), "syn"), (RiverMethod("KSWIN"), "syn")]
    results: dict[str, dict[str, Row]] = {}
    memory: dict[str, int] = {}
    for method, _ in methods:
        t1 = time.time()
        rows: dict[str, Row] = {}
        for pools, keys in (
            (syn, [k for k in streams if "Dubai" not in k]),
            (dub, [k for k in streams if "Dubai" in k]),
        ):
            if pools is None or not keys:
                continue
            method.calibrate(pools["calibration"])
            rows |= run_method(method, {k: streams[k] for k in keys})
        results[method.name] = rows
        memory[method.name] = method.memory()
        print(f"{method.name}: {time.time() - t1:.0f} s", flush=True)
    n_reps = {k: len(v) for k, v in streams.items()}
    table = _table(results, memory, n_reps)
    cmd = " ".join([".venv/bin/python bench/drift.py", *(argv if argv is not None else sys.argv[1:])]).strip()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    dubai = "" if dub is None else "; Dubai " + ", ".join(f"{k} {len(v)}" for k, v in dub.items())
    section = f"""## Drift detection: terradapt detectors vs River

Command: `{cmd}` ({when}, {time.time() - t0:.0f} s including feature extraction when not cached)

Machine: {_machine()}.

Streams: {reps} replicates per change scenario, {pre} in-distribution tiles then {post} changed tiles (resampled
with replacement from cached feature pools); no-shift: {n_reps["no shift (synthetic)"]} streams of {long} tiles.
Pools (tiles of 128 px): synthetic {", ".join(f"{k} {len(v)}" for k, v in syn.items())}{dubai}.
Every terradapt row is a RegionMonitor at ERT {ERT} tiles (all four signals); River rows run one detector per
signal on a per-tile scalar, per-check level 1/(4 x {ERT}). Cells: mean detection delay in tiles (missed
replicates). alibi-detect (MMDDriftOnline, LSDDDriftOnline) not run: it pins numpy<2 (see below).

{table}

alibi-detect: `pip install --dry-run alibi-detect` resolves only by downgrading numpy to 1.26.4
(alibi-detect 0.13.0 requires `numpy<2.0.0,>=1.16.2`, `numba<0.60`); with `numpy>=2` pinned, pip backtracks
through every release and fails (`ERROR: Failed to build 'creme'`). River 0.26.1 installs on numpy 2.x.
"""
    print(section)
    if not args.no_doc:
        write_doc(section)


if __name__ == "__main__":
    main()
