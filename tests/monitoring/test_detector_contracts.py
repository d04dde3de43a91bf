"""Contract tests generated from the detector registry: every detector, test id = its name."""

import numpy as np
import pytest

from monitoring.detectors import Detector, IncompatibleStateError, available_detectors, create_detector
from terradapt.errors import UnknownNameError

DIM = 6


def _calibrated(name: str, seed: int = 0, **config: object) -> Detector:
    rng = np.random.default_rng(seed)
    det = create_detector(name, {"window": 8, "ert": 500, **config})
    det.calibrate(rng.normal(size=(200, DIM)), rng.normal(size=(200, DIM)), rng)
    return det


def _alarms_on(det: Detector, x: np.ndarray) -> bool:
    """Feed one sample; whether the detector then flags drift."""
    det.update(x)
    return det.drift_detected


@pytest.mark.parametrize("name", available_detectors())
def test_detector_no_alarm_on_long_in_distribution_stream(name):
    det = _calibrated(name)
    rng = np.random.default_rng(1)
    alarms = 0
    for _ in range(3000):
        det.update(rng.normal(size=DIM))
        if det.drift_detected:
            alarms += 1
            det.reset()
    # ERT 500 -> about 6 alarms expected in 3000 tiles if calibration holds; far fewer than 1 per 100 tiles
    assert alarms <= 15


@pytest.mark.parametrize("name", available_detectors())
def test_detector_flags_shift_within_two_windows(name):
    det = _calibrated(name)
    rng = np.random.default_rng(2)
    for _ in range(50):
        det.update(rng.normal(size=DIM))
    assert not det.drift_detected
    delay = next((i for i in range(1, 100) if _alarms_on(det, rng.normal(size=DIM) + 1.5)), None)
    assert delay is not None
    assert delay <= 16


@pytest.mark.parametrize("name", available_detectors())
def test_detector_reset_idempotent_and_state_round_trip(name):
    det = _calibrated(name)
    rng = np.random.default_rng(3)
    xs = rng.normal(size=(40, DIM)) + np.linspace(0, 2, 40)[:, None]
    for x in xs[:20]:
        det.update(x)
    clone = _calibrated(name)  # the same calibration data and config give the same calibration
    clone.load_state_dict(det.state_dict())
    for x in xs[20:]:
        det.update(x)
        clone.update(x)
        assert (det.score, det.drift_detected, det.p_value) == (clone.score, clone.drift_detected, clone.p_value)
    det.reset()
    state = det.state_dict()
    det.reset()
    assert det.state_dict() == state
    assert not det.drift_detected and det.score == 0.0


@pytest.mark.parametrize("name", available_detectors())
def test_stream_state_holds_no_calibration_and_the_runtime_config_decides(name):
    """A stored stream state is small and never carries thresholds: a new ERT takes effect on reload."""
    det = _calibrated(name)
    rng = np.random.default_rng(4)
    for x in rng.normal(size=(12, DIM)):
        det.update(x)
    state = det.state_dict()
    assert set(state) == {"name", "window", "score", "detected", "seen", "offset"}
    stricter = _calibrated(name, ert=50_000)
    stricter.load_state_dict(state)
    assert stricter.threshold > det.threshold
    assert stricter.score == det.score


@pytest.mark.parametrize("name", available_detectors())
def test_detector_p_value_is_small_only_past_the_threshold(name):
    det = _calibrated(name)
    assert det.p_value == 1.0  # no full window yet
    rng = np.random.default_rng(5)
    for x in rng.normal(size=(8, DIM)):
        det.update(x)
    assert 0.0 <= det.p_value <= 1.0
    for x in rng.normal(size=(16, DIM)) + 3.0:
        det.update(x)
    assert det.drift_detected
    assert det.p_value < 1.0 / 500


def test_state_of_another_detector_is_refused():
    mean_shift = _calibrated("mean-shift")
    mmd = _calibrated("kernel-mmd")
    with pytest.raises(IncompatibleStateError, match="mean-shift"):
        mmd.load_state_dict(mean_shift.state_dict())


def test_unknown_detector_lists_valid_ones():
    with pytest.raises(UnknownNameError, match=r"available: .*mean-shift"):
        create_detector("nope")
