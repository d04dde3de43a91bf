import numpy as np
import pytest

from terradapt.crops.series import validate_series
from terradapt.crops.synthetic import COUNTRIES, CROP_CLASSES, CountryFactors, generate_country

NIR, RED = 6, 2  # B8, B4


def _ndvi_peak_day(parcels, label):
    days = []
    for p in parcels:
        if p.label != label:
            continue
        v = np.nanmean(np.where(p.cloud[:, None, :], np.nan, p.values), axis=2)
        ndvi = (v[:, NIR] - v[:, RED]) / (v[:, NIR] + v[:, RED])
        green = np.flatnonzero(np.nan_to_num(ndvi) > 0.5)
        days.append(p.day_of_year()[green[0]])
    return float(np.median(days))


def test_same_seed_same_parcels_and_every_parcel_is_valid():
    a = generate_country(COUNTRIES["dk-1"], 20, seed=4)
    b = generate_country(COUNTRIES["dk-1"], 20, seed=4)
    c = generate_country(COUNTRIES["dk-1"], 20, seed=5)
    assert all(np.array_equal(x.values, y.values) and x.label == y.label for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.values, y.values) for x, y in zip(a, c, strict=True))
    for p in a:
        validate_series(p)


def test_phenology_shift_moves_green_up_by_about_the_shift():
    base = CountryFactors("aa-1", "AA", 0.0, cloud_rate=0.0, first_day=1, revisit_days=3, num_dates=120)
    late = CountryFactors("aa-2", "AA", 20.0, cloud_rate=0.0, first_day=1, revisit_days=3, num_dates=120)
    wheat = CROP_CLASSES.index("wheat")
    shift = _ndvi_peak_day(generate_country(late, 120, seed=0), wheat) - _ndvi_peak_day(
        generate_country(base, 120, seed=0), wheat
    )
    assert shift == pytest.approx(20, abs=4)


def test_cloud_rate_class_prior_gain_and_calendar_follow_the_factors():
    cloudy = CountryFactors("aa-1", "AA", cloud_rate=0.5, class_prior=(0, 0, 0, 1, 0, 0), sensor_gain=(1.3,))
    clear = CountryFactors("aa-2", "AA", cloud_rate=0.0, class_prior=(0, 0, 0, 1, 0, 0), revisit_days=5, num_dates=12)
    many = generate_country(cloudy, 60, seed=0)
    assert {p.label for p in many} == {CROP_CLASSES.index("maize")}
    assert np.mean([p.cloud.any(axis=1).mean() for p in many]) == pytest.approx(0.5, abs=0.08)
    few = generate_country(clear, 60, seed=0)
    assert not any(p.cloud.any() for p in few)
    assert few[0].num_dates == 12 and int(np.diff(few[0].dates).astype(int)[0]) == 5
    winter = [p.values[0, 0][~p.cloud[0]].mean() for p in many if not p.cloud[0].all()]
    assert np.mean(winter) > 1.2 * np.mean([p.values[0, 0].mean() for p in few])  # gain 1.3 on blue


def test_bad_class_prior_is_refused():
    with pytest.raises(ValueError, match="class_prior"):
        generate_country(CountryFactors("aa-1", "AA", class_prior=(1, 1)), 3)
