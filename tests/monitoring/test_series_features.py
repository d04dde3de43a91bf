"""Time-series drift signals: what they measure, and that a calibrated detector flags shifted countries only."""

import numpy as np
import pytest
import torch

from monitoring.detectors import create_detector
from monitoring.series_features import SeriesFeatureConfig, prediction_features, series_features
from terradapt.crops.batch import to_batch
from terradapt.crops.series import ParcelSeries
from terradapt.crops.synthetic import COUNTRIES, CountryFactors, generate_country
from tests.fakes.crops import source_model

SOURCES = ("fr-1", "de-1")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _calibration() -> list[ParcelSeries]:
    return [p for r in SOURCES for p in generate_country(COUNTRIES[r], 150, seed=7)]


def _first_alarm(signal_of, calibration, stream, window: int = 8) -> int | None:
    x = signal_of(calibration)
    order = np.random.default_rng(0).permutation(len(x))
    detector = create_detector("mean-shift", {"window": window})
    detector.calibrate(x[order[::2]], x[order[1::2]], np.random.default_rng(1))
    for i, v in enumerate(signal_of(stream)):
        detector.update(v)
        if detector.drift_detected:
            return i
    return None


def test_profile_follows_the_season_and_radiometry_the_gain():
    base = CountryFactors("aa-1", "AA", cloud_rate=0.2, class_prior=(1, 0, 0, 0, 0, 0))
    late = CountryFactors("aa-2", "AA", 20.0, cloud_rate=0.2, class_prior=(1, 0, 0, 0, 0, 0), revisit_days=7)
    bright = CountryFactors("aa-3", "AA", cloud_rate=0.2, class_prior=(1, 0, 0, 0, 0, 0), sensor_gain=(1.2,))
    a, b, c = (series_features(generate_country(f, 80, seed=0)) for f in (base, late, bright))
    green_up = -2
    assert (b.profile[:, green_up].mean() - a.profile[:, green_up].mean()) * 30 == pytest.approx(20, abs=6)
    np.testing.assert_allclose(c.radiometry.mean(axis=0) / a.radiometry.mean(axis=0), 1.2, rtol=0.03)
    assert a.profile.shape == (80, len(SeriesFeatureConfig().grid) + 2) and a.radiometry.shape == (80, 3)
    assert set(a.as_dict()) == {"profile", "radiometry"}


def test_a_parcel_cloudy_on_every_date_gives_finite_zeros():
    parcel = generate_country(COUNTRIES["fr-1"], 1, seed=0)[0]
    parcel.cloud[:] = True
    signals = series_features([parcel])
    assert not signals.profile.any() and not signals.radiometry.any()


def test_unknown_band_is_refused():
    with pytest.raises(ValueError, match="B99"):
        series_features([], SeriesFeatureConfig(bands=("B99",)))


def test_prediction_features_are_probabilities_and_entropy():
    f = prediction_features(np.array([[0.0, 0.0], [100.0, 0.0]]))
    np.testing.assert_allclose(f[:, :2].sum(axis=1), 1.0)
    assert f[0, 2] == pytest.approx(np.log(2)) and f[1, 2] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(("signal", "region"), [("profile", "fr-1"), ("profile", "de-1"), ("radiometry", "fr-1")])
def test_no_alarm_on_source_countries(signal, region):
    stream = generate_country(COUNTRIES[region], 200, seed=11)
    assert _first_alarm(lambda p: series_features(p).as_dict()[signal], _calibration(), stream) is None


@pytest.mark.parametrize(
    ("signal", "region"), [("profile", "dk-1"), ("profile", "lv-1"), ("radiometry", "pt-1"), ("radiometry", "si-1")]
)
def test_shifted_countries_are_flagged_within_a_few_windows(signal, region):
    stream = generate_country(COUNTRIES[region], 200, seed=11)
    first = _first_alarm(lambda p: series_features(p).as_dict()[signal], _calibration(), stream)
    assert first is not None and first < 40


def test_prediction_shares_flag_a_gain_change_and_stay_quiet_on_source():
    model = source_model()

    def signal(parcels):
        with torch.no_grad():
            return prediction_features(model(to_batch(parcels)).numpy())

    assert _first_alarm(signal, _calibration(), generate_country(COUNTRIES["fr-1"], 120, seed=11)) is None
    first = _first_alarm(signal, _calibration(), generate_country(COUNTRIES["pt-1"], 120, seed=11))
    assert first is not None and first < 24
