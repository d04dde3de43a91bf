"""bench/crops.py at toy size: every target and column is scored, tuning and held-out countries are labelled."""

import torch

from bench import crops
from terradapt.crops.training import CropTrainConfig


def test_crops_bench_runs_and_reports_every_target_and_column():
    torch.set_num_threads(1)
    data = crops.make_data(n_source=40, n_stream=16, n_test=20, n_oracle=40, n_calibration=32)
    train = CropTrainConfig(epochs=1, batch_size=32)
    result = crops.run([0], data, train)
    for region in (*crops.TUNING, *crops.HELD_OUT):
        for column in ("source", "bn", "tent", "phenology", "phenology-bn", "system", "oracle"):
            ((oa, f1),) = result.scores[(region, column)]
            assert 0.0 <= f1 <= 1.0 and 0.0 <= oa <= 1.0
    assert not set(crops.TUNING) & set(crops.HELD_OUT)
    assert not set(crops.SOURCES) & {*crops.TUNING, *crops.HELD_OUT}
    text = crops.report(result, [0], data, train)
    assert "| dk-1 | tuning |" in text and "| pt-1 | held-out |" in text
    assert "### Macro-F1 (%)" in text and "held-out mean" in text
    assert all(f"| {c} |" in text for c in crops.CRITERIA)
    assert "### System: the crop loop" in text and "| system |" in text
    assert set(result.system) == {*crops.TUNING, *crops.HELD_OUT}
