"""bench/selection*.py: the report shift families, the tuning / report split, and the summary lines."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from adapters.selection_calibration import TUNING_SHIFTS as CALIBRATION_SHIFTS
from bench import adaptation
from bench import selection_data as data
from bench import selection_report as report
from bench import selection_runs as runs
from terradapt.datasets.base import Sample
from terradapt.datasets.synthetic import DEPARTEMENTS, shift_image
from terradapt.records import check_region


def _image(seed: int = 0, size: int = 48) -> np.ndarray:
    """A textured RGB tile: smooth gradients, blobs and noise over most of the 0..255 range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([60 + 120 * xx, 40 + 150 * yy, 90 + 80 * np.sin(6 * xx * yy)])
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _samples(n: int = 3) -> list[Sample]:
    mask = np.zeros((48, 48), dtype=np.uint8)
    return [Sample(_image(i), mask, "dubai-3", f"t{i}", None, Affine.identity()) for i in range(n)]


def _tuning_outputs(image: np.ndarray) -> dict[str, np.ndarray]:
    """What every tuning family (calibration shifts, synthetic departement presets) makes of an image."""
    out = {}
    for name, shift in CALIBRATION_SHIFTS.items():
        out[name] = image if shift is None else shift(image, np.random.default_rng(0))
    for dep in data.TUNING_DEPARTEMENTS:
        out[dep] = shift_image(image, DEPARTEMENTS[dep], np.random.default_rng(0))
    return out


@pytest.mark.parametrize("name", list(data.REPORT_SHIFTS))
def test_report_families_are_deterministic_uint8(name):
    a = data.shifted(_samples(), name, "x-3", seed=7, area=3)
    b = data.shifted(_samples(), name, "x-3", seed=7, area=3)
    for s, t, src in zip(a, b, _samples(), strict=True):
        assert s.image.dtype == np.uint8 and s.image.shape == src.image.shape
        assert np.array_equal(s.image, t.image)
        assert s.mask is not None and src.mask is not None
        assert np.array_equal(s.mask, src.mask)  # labels untouched
        assert s.region == "x-3"
    # parameters are drawn once per domain: the same tile twice in a domain is shifted alike (noise aside)
    twice = data.shifted([_samples(1)[0], _samples(1)[0]], name, "x-3", seed=7, area=3)
    assert np.abs(twice[0].image.astype(int) - twice[1].image.astype(int)).mean() < 6


@pytest.mark.parametrize("name", list(data.REPORT_SHIFTS))
def test_report_families_stay_in_range(name):
    for value in (0, 255):
        flat = np.full((3, 32, 32), value, dtype=np.uint8)
        for seed in range(4):
            fam = data.REPORT_SHIFTS[name](np.random.default_rng(seed))
            out = fam(flat, np.random.default_rng(seed))
            assert out.dtype == np.uint8
            if value == 255 and name == "gamma":
                assert (out == 255).all()  # clipped, never wrapped around
            if value == 0 and name in ("gamma", "vignette"):
                assert (out == 0).all()


@pytest.mark.parametrize("name", list(data.REPORT_SHIFTS))
def test_report_families_differ_from_every_tuning_family(name):
    image = _image()
    for seed in range(6):
        out = data.REPORT_SHIFTS[name](np.random.default_rng(seed))(image, np.random.default_rng(seed))
        for tuning, ref in _tuning_outputs(image).items():
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64)).mean()
            assert diff > 5.0, (name, seed, tuning, diff)


def _affine_residual(src: np.ndarray, out: np.ndarray) -> float:
    """RMS residual of the best per-band gain/offset map from ``src`` to ``out`` (what gain families are)."""
    res = []
    for b in range(src.shape[0]):
        x, y = src[b].ravel().astype(np.float64), out[b].ravel().astype(np.float64)
        a = np.stack([x, np.ones_like(x)], axis=1)
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        res.append(np.sqrt(np.mean((a @ coef - y) ** 2)))
    return float(np.mean(res))


def test_report_families_are_not_per_band_gain_offset():
    image = _image()
    for name in ("brighter", "darker", "warm-cast"):
        shift = CALIBRATION_SHIFTS[name]
        assert shift is not None
        assert _affine_residual(image, shift(image, np.random.default_rng(0))) < 2.0
    for name, family in data.REPORT_SHIFTS.items():
        for seed in range(4):
            out = family(np.random.default_rng(seed))(image, np.random.default_rng(seed))
            assert _affine_residual(image, out) > 3.0, (name, seed)


def test_tuning_and_report_sets_are_disjoint():
    assert not set(data.SOURCE_AREAS) & set(data.REPORT_AREAS)
    assert set(data.SOURCE_AREAS) | set(data.REPORT_AREAS) == set(range(1, 9))
    assert not set(data.REPORT_SHIFTS) & set(data.TUNING_SHIFTS)
    assert not set(data.REPORT_SHIFTS) & set(data.TUNING_DEPARTEMENTS)
    assert set(data.TUNING_SHIFTS) == set(CALIBRATION_SHIFTS)
    assert set(data.TUNING_DEPARTEMENTS) == set(adaptation.SYN_TARGETS)
    for mode in (data.QUICK, data.FULL):
        report = data.domain_plan(mode, tune=False)
        tuning = data.domain_plan(mode, tune=True)
        assert {a for a, _ in report} == set(data.REPORT_AREAS)
        assert {a for a, _ in tuning} == set(data.SOURCE_AREAS)
        assert {f for _, f in report} == {data.UNSHIFTED, *data.REPORT_SHIFTS}  # every family, even in --quick
        assert {f for _, f in tuning} <= set(data.TUNING_SHIFTS)
        regions = [data.region_code(f, a) for a, f in report + tuning]
        assert len(set(regions)) == len(regions)
        for r in regions:
            check_region(r)
    assert len(data.domain_plan(data.FULL, tune=False)) == 16
    assert len(data.domain_plan(data.FULL, tune=True)) == 16
    assert {f for _, f in data.domain_plan(data.FULL, tune=True)} == set(data.TUNING_SHIFTS)


def _row(region: str, shift: str, source: float, system: float, bn: float, oracle: float = 0.9) -> runs.DomainResult:
    d = data.Domain(region, region.split("-")[1], shift, tuning=False)
    methods = {f"{m}@{b}": (bn - 0.1 * (b == 1), 1.0) for m in ("bn", data.SYSTEM_METHOD) for b in (1, 4)}
    return runs.DomainResult(d, source, system, oracle, methods=methods)


def test_summary_lines_on_a_hand_made_table():
    rows = [
        _row("dubai-3", "none", source=0.50, system=0.50, bn=0.40),  # unshifted, left alone
        _row("dubai-4", "none", source=0.40, system=0.394, bn=0.30),  # 0.6 points below: worse
        _row("gamma-3", "gamma", source=0.20, system=0.35, bn=0.30),  # beats bn
        _row("vignette-4", "vignette", source=0.30, system=0.296, bn=0.45),  # 0.4 below: not counted
    ]
    s = report.summarise(rows)
    assert s.domains == 4
    assert [r.chooser for r in rows] == [0.50, 0.40, 0.30, 0.45]  # perfect chooser = max(source, bn@4)
    assert s.chooser == pytest.approx(np.mean([0.50, 0.40, 0.30, 0.45]))
    assert s.source == pytest.approx(0.35)
    assert s.system == pytest.approx(np.mean([0.50, 0.394, 0.35, 0.296]))
    assert s.bn == pytest.approx(np.mean([0.40, 0.30, 0.30, 0.45]))
    assert s.unshifted_source == pytest.approx(0.45) and s.unshifted_system == pytest.approx(0.447)
    assert s.shifted_source == pytest.approx(0.25) and s.shifted_system == pytest.approx(0.323)
    assert s.worse == ("dubai-4",)
    targets = list(s.targets().values())
    assert targets == [False, False, True]  # 0.385 < 0.4125; unshifted 0.447 < 0.45; 1 worse <= 1
    better = [_row("dubai-3", "none", 0.5, 0.5, 0.4), _row("gamma-3", "gamma", 0.2, 0.35, 0.3)]
    assert all(report.summarise(better).targets().values())
    text = "\n".join(report.summary_lines(s, "report"))
    assert "1 of 4 (dubai-4)" in text and "**no**" in text


def test_estimator_choice_uses_only_calibrated_methods_above_the_margin():
    row = _row("gamma-3", "gamma", source=0.2, system=0.2, bn=0.3)
    row.methods["prior-em@4"] = (0.05, 1.0)
    row.calibrated = ("bn",)
    row.estimates = {"bn@4": (0.03, 0.1), "bn@1": (0.01, 0.0), "prior-em@4": (0.5, -0.15)}
    row.margins = dict.fromkeys(row.estimates, 0.02)
    assert row.selected == ("bn@4", 0.3)  # prior-em's huge estimate is out of the estimator's calibration
    assert row.estimate_error() == pytest.approx(np.mean([0.07, 0.01]))
    assert row.estimate_error(every=True) == pytest.approx(np.mean([0.07, 0.01, 0.65]))
    row.margins["bn@4"] = 0.05
    assert row.selected == ("source", 0.2)


def test_rolling_window_check():
    assert runs.rolling_worst([0.5, 0.4, 0.6, 0.5], [0.5, 0.5, 0.5, 0.5], 2) == pytest.approx(-0.05)
    assert runs.rolling_worst([0.4], [0.5], 4) == pytest.approx(-0.1)


def test_oracle_is_the_few_shot_procedure_with_every_stream_label(monkeypatch):
    calls: dict[str, object] = {}

    def fake(model, images, masks, unlabelled, config, seed=0, device="cpu"):
        calls.update(images=len(images), masks=len(masks), unlabelled=tuple(unlabelled.shape), steps=config.steps)
        return model

    monkeypatch.setattr(runs, "few_shot_adapt", fake)
    stream = _samples(3)
    model = object()
    assert runs.oracle(model, stream, data.QUICK, seed=0) is model  # type: ignore[arg-type]
    assert calls == {"images": 3, "masks": 3, "unlabelled": (3, 3, 48, 48), "steps": data.QUICK.oracle_steps}
    assert data.QUICK.oracle_steps >= 2 * data.QUICK.fewshot_steps
    assert data.FULL.oracle_steps >= 2 * data.FULL.fewshot_steps


def test_entry_point_imports_as_a_module_and_as_a_script():
    import subprocess
    import sys
    from pathlib import Path

    from bench import selection

    assert callable(selection.main) and callable(selection.run)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "selection.py"), "--help"], capture_output=True, text=True, check=True
    )
    assert "--quick" in out.stdout and "--tune" in out.stdout
