"""Selection benchmark (issue 12): does terradapt know when and how much to adapt, on areas and shifts it never saw?

Writes its section of docs/benchmarks.md (``--tune`` prints instead: see below).

Protocol. Real Dubai aerial areas (``terradapt.datasets.dubai.DubaiDataset``), cut into ``tile`` px patches and
shuffled per area with the seed, exactly as ``stream.scenarios.dubai_scenario`` does (the ERM source model is
trained and cached under .terradapt/bench/ by ``stream.scenarios.source_model``: the same model as
bench/adaptation.py's for the same sizes; the other protocols' under .terradapt/bench/selection-sources/).

* Source areas 1, 2, 7, 8: per area ``train_tiles`` training patches, then 40 calibration patches (160 in all:
  they calibrate the drift monitor, the BBSE confusion matrix and the label-free selection estimator, and are
  never trained on), then the tiles of that area's tuning domains (never trained on either).
* **Tuning set** (what anyone may look at while choosing defaults): the source areas' held-out tiles under the
  tuning shift families, i.e. the radiometric families of ``adapters.selection_calibration.TUNING_SHIFTS`` (the
  estimator is calibrated on them): area 1 and 7 as is and under brighter / darker / warm-cast, areas 2 and 8 as
  is and under haze / light-haze / blur-noise (16 domains); plus the synthetic departements of
  bench/adaptation.py (D013, D067, D029, D074, with their own synthetic source model).
* **Report set** (looked at only to report): the unseen areas 3, 4, 5, 6, each as is ("none") and under three
  report families that no tuning family contains (``REPORT_SHIFTS``, deterministic given the seed, parameters
  drawn once per domain): ``gamma`` (non-linear tone curve, exponent 0.6 or 1.6 with a per-band difference),
  ``vignette`` (radial or linear illumination gradient darkening to 55% at the edge, plus a colour tint),
  ``low-contrast`` (contrast compressed toward a grey level, desaturation, sensor noise). 4 x 4 = 16 domains.
  The same base tiles of an area make its four domains: the first ``stream`` are streamed (unlabelled), the
  next ``held_out`` are labelled and only ever used to evaluate.

Per domain:
* source-only mIoU on the held-out tiles;
* the **system**: the embedded runner with the default settings (bench/adaptation.py ``run_policy``; the trigger
  needs 16 tiles since detection, 4 in ``--quick`` where streams are short): every domain is a region, its stream
  goes through monitor -> trigger -> adapter (the default method, ``AdaptationConfig().method``, batch 4) ->
  gate (with the label-free selection the registry bootstrap calibrates), and the region is evaluated with the
  version it serves at the end;
* every label-free method of ``adapters.registry.available_adapters()`` (those whose ``source_replay`` is not
  "required": coral and dann replay source tiles and are left out) adapted on the stream tiles at batch 1 and 4;
* the perfect chooser: max(source-only, ``bn`` at batch 4) per domain (a reference no label-free rule reaches);
* a labelled oracle (an upper reference, not a method): the few-shot procedure with *every* stream tile labelled,
  ``adapters.fewshot.few_shot_adapt`` from the source model on all the stream tiles' images and masks (BatchNorm
  statistics re-estimated on the stream first, then ``oracle_steps`` L2-SP-anchored fine-tuning steps: 40 in
  ``--quick``, 120 in full, 2-3x the few-shot curve's). Not bench/adaptation.py's oracle, which fine-tunes with
  BatchNorm in train mode and ends below source-only on the Dubai areas;
* the label-free selection estimator (``adapters.selection.Selector`` fitted, with the default
  ``SelectionConfig``, on the domains ``adapters.selection_calibration.calibrate_selection`` makes of the source
  calibration tiles under the tuning families, for the system's method(s) and ``bn``): for every candidate
  (method, batch), its estimate of the mIoU change from the two versions' outputs on the stream tiles
  (``version_outputs``, ``selection_features``, the BBSE class-mix estimate as reference) against the true change
  on the held-out tiles; per-domain mean absolute error over the calibrated methods' candidates (methods without
  an estimator of their own get the pooled fit: reported, flagged), and what choosing by the estimate would give
  (the best estimate above its margin among the calibrated methods, else source-only);
* compute: adaptation time per tile / inference time per tile (the system: the whole loop per streamed tile).

Summary (the issue's targets): mean mIoU over the 16 domains of source-only / system / bn / perfect chooser /
oracle; the same means over the unshifted ("none") and the shifted domains; how many domains the system leaves
more than 0.5 mIoU points below source-only. Targets: system mean >= perfect chooser, unshifted mean not below
source-only, at most 1 of 16 domains worse by > 0.5.

Few-shot curve: for each source training protocol (``PROTOCOLS``, ``terradapt.protocols`` with default configs,
the source areas as domains), K in 1, 2, 4, 8 labelled tiles of the domain's stream (the rest of the stream given
unlabelled) through ``adapters.fewshot.few_shot_adapt``; K = 0 is that procedure's unlabelled term alone
(``reestimate_bn`` on the stream). On ``fewshot_domains`` domains (one per area, the conditions in turn): mean
mIoU and the share of the source -> oracle gap (ERM source, ERM oracle) it closes, and each protocol's
source-only mIoU.

Long stream: ``cycles`` passes through every domain of the set as the acquisitions of *one* region (no reset);
after each segment the version the region serves is evaluated on that segment's held-out tiles; the system must
never fall below source-only over any rolling window of ``ROLLING`` segments.

Code: bench/selection_data.py (this protocol: areas, shift families, modes, domains), bench/selection_runs.py
(per-domain runs, oracle, system, few-shot curve, long stream), bench/selection_report.py (summary, tables, the
docs section); this file runs them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

# run as a script, bench/ is first on sys.path and bench/serving.py would shadow the serving package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.doc_section import write_section
from bench.selection_data import FULL, QUICK, Mode, demo_config, dubai_set, fewshot_domains, synthetic_set
from bench.selection_report import render
from bench.selection_runs import Stopwatch, few_shot_curve, long_stream, protocol_models, run_block
from stream.config import Settings
from stream.scenarios import source_model


def run(mode: Mode, seed: int, tune: bool, command: str) -> str:
    """The whole benchmark in one mode; returns the docs section."""
    t0, clock = time.perf_counter(), Stopwatch()
    cfg = Settings.model_validate({"runtime": {"device": "cpu"}, "adaptation": {"device": "cpu"}})
    demo = demo_config(mode, seed, "dubai")
    dcfg = cfg.model_copy(update={"demo": demo})
    sc, domains = dubai_set(mode, seed, tune)
    clock.lap("data")
    model, manifest, _ = source_model(demo, sc, device="cpu")
    models = protocol_models(model, sc, mode, seed)
    clock.lap("source models")
    # first: the few-shot step is the one that depends on other modules (adapters.fewshot, the protocols)
    fewshot = few_shot_curve(sc, fewshot_domains(domains, mode.fewshot_domains), domains, models, mode, seed)
    clock.lap("few-shot")
    label = "Dubai tuning set" if tune else "Dubai report set"
    blocks = [run_block(sc, domains, model, manifest, dcfg, mode, seed, label, clock)]
    if tune:
        syn, syn_domains = synthetic_set(mode, seed)
        sdemo = demo_config(mode, seed, "synthetic")
        smodel, smanifest, _ = source_model(sdemo, syn, device="cpu")
        clock.lap("source models")
        scfg = cfg.model_copy(update={"demo": sdemo})
        syn_label = "Synthetic departements"
        blocks.append(run_block(syn, syn_domains, smodel, smanifest, scfg, mode, seed, syn_label, clock))
    longs = long_stream(sc, model, manifest, dcfg, mode)
    clock.lap("long stream")
    return render(command, mode, tune, blocks, fewshot, longs, time.perf_counter() - t0, clock)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small tiles, short streams, 8 domains (minutes)")
    parser.add_argument("--tune", action="store_true", help="the same tables on the tuning set (prints only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = ".venv/bin/python bench/selection.py" + " --quick" * args.quick + " --tune" * args.tune
    command += f" --seed {args.seed}" if args.seed else ""
    section = run(QUICK if args.quick else FULL, args.seed, args.tune, command)
    print(section)
    if not args.no_write and not args.tune:  # the docs carry the report set; tuning runs are printed only
        write_section("selection", section)


if __name__ == "__main__":
    main()
