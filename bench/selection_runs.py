"""Selection benchmark, runs: per-domain methods, oracle and estimates, the system, few-shot curve, long stream.

See bench/selection.py (the entry point) for the whole protocol.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adapters.fewshot import FewShotConfig, few_shot_adapt, reestimate_bn
from adapters.registry import adapter_class, available_adapters, create_adapter
from adapters.selection import FEATURES, Selector, class_shares, selection_features, version_outputs
from adapters.selection_calibration import calibrate_selection
from adapters.trigger import TriggerConfig
from bench import adaptation
from bench.selection_data import (
    BATCHES,
    PROTOCOLS,
    SHOTS,
    SYSTEM_BATCH,
    Domain,
    Mode,
    avg,
    sample_masks,
    tensor,
)
from monitoring.label_shift import BBSE
from serving.store import MemoryStore
from stream.build import embedded_runner
from stream.config import Settings
from stream.demo import demo_settings, fresh_registry
from stream.scenarios import Scenario, stream_item
from terradapt.checkpoint import ModelManifest, load_checkpoint, save_checkpoint
from terradapt.classes import IGNORE_INDEX
from terradapt.datasets.base import Sample
from terradapt.model import SegmentationModel, UNetConfig
from terradapt.training import TrainConfig, train_source_checkpoint


# -- per-domain evaluation -------------------------------------------------------------------------------------
@dataclass
class DomainResult:
    """One domain's numbers (mIoU as fractions): methods by "name@batch" -> (mIoU, compute / inference)."""

    domain: Domain
    source: float
    system: float
    oracle: float
    methods: dict[str, tuple[float, float]] = field(default_factory=dict)
    estimates: dict[str, tuple[float, float]] = field(default_factory=dict)  # candidate -> (estimated, true) change
    margins: dict[str, float] = field(default_factory=dict)  # candidate -> the margin its estimate must clear
    calibrated: tuple[str, ...] = ()  # methods with an estimator of their own (the others get the pooled fit)
    system_cost: float = float("nan")
    decision: str = ""

    @property
    def bn(self) -> float:
        return self.methods[f"bn@{SYSTEM_BATCH}"][0]

    @property
    def chooser(self) -> float:
        """The perfect per-domain choice between source-only and ``bn``."""
        return max(self.source, self.bn)

    def in_calibration(self, candidate: str) -> bool:
        """Whether a candidate ("method@batch") is of a method the estimator was calibrated with."""
        return candidate.split("@")[0] in self.calibrated

    def estimate_error(self, every: bool = False) -> float:
        """Mean absolute error of the estimates over the candidates of calibrated methods (``every``: all)."""
        errors = [abs(e - t) for c, (e, t) in self.estimates.items() if every or self.in_calibration(c)]
        return avg(errors)

    @property
    def selected(self) -> tuple[str, float]:
        """Choosing by the estimator among its calibrated methods: the best estimate above its margin, else source."""
        ok = {c: e for c, (e, _) in self.estimates.items() if e > self.margins[c] and self.in_calibration(c)}
        if not ok:
            return "source", self.source
        best = max(ok, key=lambda c: ok[c])
        return best, self.methods[best][0]


def label_free_methods() -> list[str]:
    """Registered methods that adapt from target tiles alone (no source replay required)."""
    return [n for n in available_adapters() if adapter_class(n).source_replay != "required"]


@torch.no_grad()
def source_bbse(model: SegmentationModel, calibration: Sequence[Sample]) -> BBSE:
    """BBSE with the source confusion matrix of the labelled calibration tiles (what the system's jobs use)."""
    k = model.config.num_classes
    outs = version_outputs(model, tensor(calibration))
    pred = np.concatenate([np.asarray(m).ravel() for m in outs.maps])
    true = np.concatenate([m.ravel() for m in sample_masks(calibration)])
    keep = true != IGNORE_INDEX
    return BBSE.from_labels(true[keep], pred[keep], k)


def oracle(model: SegmentationModel, stream: Sequence[Sample], mode: Mode, seed: int) -> SegmentationModel:
    """The labelled upper reference: the source model fine-tuned with *every* stream tile's label.

    The few-shot procedure (``adapters.fewshot.few_shot_adapt``) with K = all the stream: BatchNorm statistics
    re-estimated on the stream tiles first (then frozen), then ``mode.oracle_steps`` steps of L2-SP-anchored
    fine-tuning on random crops of the labelled tiles. Not bench/adaptation.py's oracle: that one fine-tunes with
    BatchNorm in train mode on batches of 4 and ends below source-only on the Dubai areas, so it bounded nothing.
    """
    config = FewShotConfig(steps=mode.oracle_steps)
    return few_shot_adapt(model, [s.image for s in stream], sample_masks(stream), tensor(stream), config, seed)


def evaluate_domain(
    domain: Domain,
    sc: Scenario,
    model: SegmentationModel,
    manifest: ModelManifest,
    selector: Selector,
    bbse: BBSE,
    mode: Mode,
    seed: int,
) -> DomainResult:
    """Source-only, oracle, every label-free method at every batch size, and the estimator on each candidate."""
    stream, held = sc.streams[domain.region], sc.held_out[domain.region]
    x = tensor(stream)
    k = model.config.num_classes
    prior = manifest.class_prior or None
    prior_t = torch.tensor(prior, dtype=torch.float32) if prior else None
    source = adaptation.score(model, held)
    oracle_miou = adaptation.score(oracle(model, stream, mode, seed), held)
    row = DomainResult(domain, source, float("nan"), oracle_miou, calibrated=selector.methods)
    current = version_outputs(model, x)
    reference = bbse.estimate(class_shares(current.maps, k)).as_tuple()
    for b in BATCHES:
        infer = adaptation.inference_seconds(model, x, b)
        for name in label_free_methods():
            torch.manual_seed(seed)
            adapter = create_adapter(name, model, {"device": "cpu"}, class_prior=prior_t)
            t = time.perf_counter()
            adapted = adapter.adapt(x[i : i + b] for i in range(0, len(x), b))
            cost = (time.perf_counter() - t) / len(x) / infer
            m = adaptation.score(adapted, held)
            key = f"{name}@{b}"
            row.methods[key] = (m, cost)
            feats = selection_features(version_outputs(adapted, x), current, k, reference, prior)
            estimate = selector.estimate(name, feats)
            row.estimates[key], row.margins[key] = (estimate.gain, m - source), estimate.margin
    return row


def run_system(
    sc: Scenario,
    model: SegmentationModel,
    manifest: ModelManifest,
    cfg: Settings,
    mode: Mode,
    rows: Sequence[DomainResult],
    name: str,
) -> None:
    """The embedded runner with the default settings on every domain's stream (one region per domain)."""
    settings = adaptation.policy_config(cfg, mode.base, SYSTEM_BATCH, f"selection-{name}")
    infer = float(np.mean([adaptation.inference_seconds(model, tensor(v), SYSTEM_BATCH) for v in sc.streams.values()]))
    outcome = adaptation.run_policy(sc, model, manifest, settings)
    for row in rows:
        m, per_tile, what = outcome[row.domain.region]
        row.system, row.system_cost, row.decision = m, per_tile / infer, what


# -- few-shot curve --------------------------------------------------------------------------------------------
@dataclass
class FewShot:
    """Mean mIoU over the domains per protocol: source-only and after few-shot adaptation with K labelled tiles."""

    regions: list[str]
    source: dict[str, float] = field(default_factory=dict)
    # over every domain of the set: protocol -> (all, unshifted, shifted) source-only mean mIoU
    source_all: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    shots: dict[str, dict[int, float]] = field(default_factory=dict)


def protocol_models(erm: SegmentationModel, sc: Scenario, mode: Mode, seed: int) -> dict[str, SegmentationModel]:
    """The source model of every protocol in ``PROTOCOLS`` on the same tiles (ERM: the cached source model).

    The others are trained here with their default configs (the source regions as domains) and cached under
    .terradapt/bench/selection-sources/.
    """
    models = {"erm": erm}
    images, masks = [s.image for s in sc.train], sample_masks(sc.train)
    ids = [f"{s.region}/{s.tile_id}" for s in sc.train]
    for protocol in PROTOCOLS:
        if protocol == "erm":
            continue
        key = json.dumps([protocol, mode.tile, mode.train_steps, mode.base_channels, seed, ids])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        directory = Path(".terradapt/bench/selection-sources") / f"{protocol}-{digest}"
        if (directory / "manifest.json").exists():
            models[protocol] = load_checkpoint(directory)[0]
            continue
        t = time.perf_counter()
        model, manifest = train_source_checkpoint(
            images,
            masks,
            UNetConfig(in_channels=len(sc.bands), num_classes=len(sc.classes), base_channels=mode.base_channels),
            TrainConfig(steps=mode.train_steps, seed=seed, device="cpu"),
            classes=sc.classes,
            bands=sc.bands,
            regions=sc.source_regions,
            tile_ids=ids,
            protocol=protocol,
            domains=[s.region for s in sc.train],
        )
        save_checkpoint(directory, model, manifest)
        models[protocol] = model
        print(f"source model {protocol}: trained in {time.perf_counter() - t:.0f} s", flush=True)
    return models


def few_shot_curve(
    sc: Scenario,
    domains: Sequence[Domain],
    every: Sequence[Domain],
    models: dict[str, SegmentationModel],
    mode: Mode,
    seed: int,
) -> FewShot:
    """K labelled stream tiles (the rest unlabelled) per domain, for each protocol's source model.

    K = 0 is the procedure without labels: its unlabelled term alone (BatchNorm statistics re-estimated on every
    stream tile, ``adapters.fewshot.reestimate_bn``); ``few_shot_adapt`` needs at least one labelled tile.
    """
    config = FewShotConfig(steps=mode.fewshot_steps)
    out = FewShot(regions=[d.region for d in domains])
    for protocol, model in models.items():
        base = {d.region: adaptation.score(model, sc.held_out[d.region]) for d in every}
        out.source[protocol] = avg([base[r] for r in out.regions])
        out.source_all[protocol] = (
            avg(list(base.values())),
            avg([base[d.region] for d in every if not d.shifted]),
            avg([base[d.region] for d in every if d.shifted]),
        )
        out.shots[protocol] = {}
        for k in SHOTS:
            scores = []
            for r in out.regions:
                stream, held = sc.streams[r], sc.held_out[r]
                labelled, rest = stream[:k], stream[k:]
                if k == 0:
                    adapted = copy.deepcopy(model)
                    reestimate_bn(adapted, list(tensor(stream)), config.unlabelled_weight)
                else:
                    unlabelled = tensor(rest) if rest else None
                    adapted = few_shot_adapt(
                        model, [s.image for s in labelled], sample_masks(labelled), unlabelled, config, seed
                    )
                scores.append(adaptation.score(adapted, held))
            out.shots[protocol][k] = avg(scores)
            print(f"few-shot {protocol} K={k}: {100 * out.shots[protocol][k]:.1f}", flush=True)
    return out


# -- long stream -----------------------------------------------------------------------------------------------
@dataclass
class LongStream:
    """Per segment: its region, and the mIoU of source-only and of the version the system serves after it."""

    regions: list[str]
    source: list[float]
    system: list[float]


def long_stream(
    sc: Scenario, model: SegmentationModel, manifest: ModelManifest, cfg: Settings, mode: Mode
) -> LongStream:
    """``cycles`` passes through every domain as one region's acquisitions (as bench/adaptation.py, system only)."""
    order = [r for _ in range(mode.cycles) for r in sc.streams]
    base = {r: adaptation.score(model, sc.held_out[r]) for r in sc.streams}
    # a version per segment at most: cooldown under a segment, and a budget that does not run out over the stream
    trigger = TriggerConfig(
        min_tiles=adaptation.min_tiles(mode.base), cooldown_tiles=mode.stream // 2, max_versions=1000
    )
    demo = cfg.demo.model_copy(update={"workdir": Path(".terradapt/bench/selection-long")})
    settings = demo_settings(cfg.model_copy(update={"demo": demo, "trigger": trigger}), sc)
    settings = settings.model_copy(update={"stream": settings.stream.model_copy(update={"regions": ("long-1",)})})
    registry = fresh_registry(settings, sc, model, manifest)
    runner = embedded_runner(settings, registry, MemoryStore("predictions", per_prefix=64), spec=sc.spec)
    out = LongStream(order, [base[r] for r in order], [])
    index = 0
    for r in order:
        for sample in sc.streams[r]:
            runner.step(stream_item("long-1", index, sample, sc.bands))
            index += 1
        out.system.append(adaptation.score(registry.load("long-1")[0], sc.held_out[r]))
    return out


def rolling_worst(system: Sequence[float], source: Sequence[float], width: int) -> float:
    """The lowest mean (system - source) over any ``width`` consecutive segments (all of them if fewer)."""
    d = np.asarray(system, dtype=np.float64) - np.asarray(source, dtype=np.float64)
    w = max(1, min(width, d.size))
    return float(np.convolve(d, np.ones(w) / w, mode="valid").min())


@dataclass
class Block:
    """One table of domains: its label, rows, and the estimator's fit on its own calibration domains."""

    label: str
    rows: list[DomainResult]
    calibration_mae: float
    margins: dict[str, float]  # per calibrated method


# -- main ------------------------------------------------------------------------------------------------------
class Stopwatch:
    """Wall-clock seconds per stage (the sizing of the modes is based on them)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + now - self._t
        self._t = now
        print(f"[{stage}: {self.times[stage]:.0f} s]", flush=True)

    def line(self) -> str:
        return ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.times.items())


def run_block(
    sc: Scenario,
    domains: Sequence[Domain],
    model: SegmentationModel,
    manifest: ModelManifest,
    cfg: Settings,
    mode: Mode,
    seed: int,
    label: str,
    clock: Stopwatch,
) -> Block:
    """Every per-domain column of one set, then the system on all its domains at once."""
    cal_images, cal_masks = [s.image for s in sc.calibration], sample_masks(sc.calibration)
    areas = [s.region for s in sc.calibration]
    methods = tuple(dict.fromkeys([*cfg.adaptation.methods(), "bn"]))  # the system's, and the chooser's
    config = cfg.adaptation.gate.selection
    cal_domains = calibrate_selection(
        model,
        manifest,
        cal_images,
        cal_masks,
        areas,
        methods=methods,
        tiles_per_domain=config.calibration_tiles_per_domain,
        seed=seed,
        device="cpu",
    )
    selector = Selector(cal_domains, config)
    cal_mae = avg([abs(selector.estimate(d.method, d.features).gain - d.gain) for d in cal_domains])
    bbse = source_bbse(model, sc.calibration)
    clock.lap("selection calibration")
    rows = []
    for d in domains:
        r = evaluate_domain(d, sc, model, manifest, selector, bbse, mode, seed)
        rows.append(r)
        print(f"{d.region}: source {100 * r.source:.1f} bn {100 * r.bn:.1f} oracle {100 * r.oracle:.1f}", flush=True)
    clock.lap("methods + oracle + estimates")
    run_system(sc, model, manifest, cfg, mode, rows, label.split()[0].lower())
    clock.lap("system")
    margins = {m: selector.estimate(m, dict.fromkeys(FEATURES, 0.0)).margin for m in selector.methods}
    return Block(label, rows, cal_mae, margins)
