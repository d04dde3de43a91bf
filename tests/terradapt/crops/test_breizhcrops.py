import numpy as np
import pytest

from terradapt.crops.breizhcrops import CSV_COLUMNS, BreizhCropsDataset, area_region, write_breizhcrops
from terradapt.crops.series import S2_BANDS, validate_series
from terradapt.crops.synthetic import COUNTRIES, CROP_CLASSES, generate_country
from terradapt.errors import InvalidSeriesError, UnknownRegionError


def test_written_layout_reads_back_as_parcel_means(tmp_path):
    parcels = generate_country(COUNTRIES["fr-1"], 6, seed=1, pixels=4)
    write_breizhcrops(tmp_path, "frh01", parcels, CROP_CLASSES)
    assert (tmp_path / "classmapping.csv").is_file()
    assert (tmp_path / "ids" / "frh01.txt").read_text().split() == [p.parcel_id for p in parcels]
    header = (tmp_path / "csv" / "frh01" / f"{parcels[0].parcel_id}.csv").read_text().splitlines()[0]
    assert header.split(",") == list(CSV_COLUMNS)
    dataset = BreizhCropsDataset(tmp_path)
    assert dataset.classes == CROP_CLASSES
    assert dataset.band_names == S2_BANDS
    assert dataset.regions() == ["frh-1"]
    for parcel in parcels:
        back = validate_series(dataset.load("frh-1", parcel.parcel_id))
        assert back.num_pixels == 1 and back.label == parcel.label and back.region == "frh-1"
        np.testing.assert_array_equal(back.dates, parcel.dates)
        clear = ~parcel.cloud
        weight = np.where(clear.any(axis=1, keepdims=True), clear, True)
        expected = (parcel.values * weight[:, None, :]).sum(axis=2) / weight.sum(axis=1)[:, None]
        np.testing.assert_allclose(back.values[:, :, 0], expected, atol=1e-4)  # 1e-4 = one reflectance unit
        np.testing.assert_array_equal(back.cloud[:, 0], parcel.cloud.mean(axis=1) >= 0.5)


def _write_rows(tmp_path, rows, columns=CSV_COLUMNS):
    write_breizhcrops(tmp_path, "frh02", generate_country(COUNTRIES["fr-1"], 1, seed=0), CROP_CLASSES)
    path = tmp_path / "csv" / "frh02" / "P000000.csv"
    path.write_text(",".join(columns) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return BreizhCropsDataset(tmp_path)


def _row(day, b2=1000, qa60=0, label="C3"):
    by_band = dict.fromkeys(CSV_COLUMNS[:13], 500) | {"B2": b2}
    return [*(by_band[b] for b in CSV_COLUMNS[:13]), 0, 0, qa60, day, label, "P000000"]


def test_rows_are_sorted_and_same_day_rows_averaged_with_qa60_as_cloud_mask(tmp_path):
    dataset = _write_rows(
        tmp_path,
        [_row("2017-03-11", 3000), _row("2017-01-05", 1000, qa60=1024), _row("2017-03-11", 1000), _row("2017-02-01")],
    )
    series = validate_series(dataset.load("frh-2", "P000000"))
    assert [str(d) for d in series.dates] == ["2017-01-05", "2017-02-01", "2017-03-11"]
    assert series.values[2, S2_BANDS.index("B2"), 0] == pytest.approx(0.2)
    assert series.cloud[:, 0].tolist() == [True, False, False]
    assert series.label == 3
    assert series.day_of_year().tolist() == [5, 32, 70]


def test_unknown_crop_code_is_unlabelled(tmp_path):
    dataset = _write_rows(tmp_path, [_row("2017-01-05", label="XYZ"), _row("2017-02-05", label="XYZ")])
    assert dataset.load("frh-2", "P000000").label == -1


def test_missing_column_and_bad_value_are_invalid_series(tmp_path):
    no_doa = tuple(c for c in CSV_COLUMNS if c != "doa")
    dataset = _write_rows(
        tmp_path, [[v for c, v in zip(CSV_COLUMNS, _row("2017-01-05"), strict=True) if c != "doa"]], no_doa
    )
    with pytest.raises(InvalidSeriesError, match="doa"):
        dataset.load("frh-2", "P000000")
    dataset = _write_rows(tmp_path, [_row("not-a-date")])
    with pytest.raises(InvalidSeriesError, match="values"):
        dataset.load("frh-2", "P000000")


def test_unknown_region_and_missing_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="classmapping"):
        BreizhCropsDataset(tmp_path)
    write_breizhcrops(tmp_path, "frh01", generate_country(COUNTRIES["fr-1"], 1, seed=0), CROP_CLASSES)
    with pytest.raises(UnknownRegionError, match="frh-1"):
        BreizhCropsDataset(tmp_path).parcel_ids("frh-9")
    with pytest.raises(FileNotFoundError, match="P999"):
        BreizhCropsDataset(tmp_path).load("frh-1", "P999")


def test_area_names_become_region_codes():
    assert area_region("frh01") == "frh-1"
    assert area_region("frh04") == "frh-4"
    with pytest.raises(ValueError, match="area"):
        area_region("belle-ile")
