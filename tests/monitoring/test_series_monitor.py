"""The per-region series monitor: calibration, a steady stream, a shifted one, warm-up after a model change, state."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from monitoring.calibration import CalibrationError
from monitoring.series_monitor import SeriesMonitor, SeriesMonitorConfig

DIMS = {"profile": 13, "radiometry": 3, "prediction": 7}


def vectors(n: int, rng: np.random.Generator, shift: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    shift = shift or {}
    return {k: rng.normal(shift.get(k, 0.0), 1.0, size=(n, d)) for k, d in DIMS.items()}


def calibrated(config: SeriesMonitorConfig | None = None) -> SeriesMonitor:
    rng = np.random.default_rng(0)
    monitor = SeriesMonitor(config)
    monitor.calibrate(vectors(200, rng), vectors(200, rng), seed=0)
    return monitor


def feed(monitor: SeriesMonitor, data: dict[str, np.ndarray], version: int = 0) -> list[int]:
    """Parcel indices (1-based) at which drift newly started."""
    n = len(next(iter(data.values())))
    return [i + 1 for i in range(n) if monitor.update({k: v[i] for k, v in data.items()}, version).newly_detected]


def test_steady_stream_raises_no_alarm_and_a_shift_is_flagged() -> None:
    rng = np.random.default_rng(1)
    monitor = calibrated()
    assert feed(monitor, vectors(500, rng)) == []
    detected = feed(monitor, vectors(40, rng, {"radiometry": 1.5}))
    assert detected and detected[0] <= 20
    assert monitor.drift_detected


def test_prediction_alone_is_not_covariate() -> None:
    rng = np.random.default_rng(2)
    monitor = calibrated()
    updates = [monitor.update({k: v[i] for k, v in vectors(30, rng, {"prediction": 2.0}).items()}) for i in range(30)]
    fired = [u for u in updates if u.fired]
    assert fired and all(u.fired == ("prediction",) and not u.covariate_shift for u in fired)


def test_a_new_model_version_warms_up_then_takes_the_stream_as_normal() -> None:
    rng = np.random.default_rng(3)
    monitor = calibrated(SeriesMonitorConfig(warmup_parcels=40))
    assert feed(monitor, vectors(40, rng, {"profile": 1.5}))
    # the adapted version's region: shifted data is its new normal after the warm-up
    assert feed(monitor, vectors(300, rng, {"profile": 1.5}), version=1) == []
    assert not monitor.warming_up and not monitor.drift_detected


def test_state_round_trip_keeps_the_stream() -> None:
    rng = np.random.default_rng(4)
    a, b = calibrated(), calibrated()
    data = vectors(30, rng)
    feed(a, data)
    b.load_state_dict(a.state_dict())
    more = vectors(20, rng, {"profile": 1.0})
    ua = [a.update({k: v[i] for k, v in more.items()}).scores for i in range(20)]
    ub = [b.update({k: v[i] for k, v in more.items()}).scores for i in range(20)]
    assert ua == ub


def test_too_few_calibration_parcels_and_unknown_signals_are_refused() -> None:
    rng = np.random.default_rng(5)
    with pytest.raises(CalibrationError, match="windows of 16"):
        SeriesMonitor().calibrate(vectors(10, rng), vectors(10, rng))
    with pytest.raises(ValidationError, match="signals"):
        SeriesMonitorConfig(signals=("deep",))
