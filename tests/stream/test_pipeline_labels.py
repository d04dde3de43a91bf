"""``Pipeline.process_label``: what the faust labels agent runs for each delayed label (unit tests, no broker).

The label is joined with the stored prediction COG of its acquisition (whose tags name the model version), the
region's tracker state is returned for the table, and accuracy reaches the metrics.
"""

import json

import numpy as np
import pytest
from affine import Affine
from prometheus_client import CollectorRegistry

from monitoring.metrics import ServiceMetrics
from stream.observer import MetricsObserver
from terradapt.raster import Raster, raster_to_geotiff_bytes
from terradapt.records import LabelRecord
from tests.fakes.world import make_rig, publish, settings


@pytest.fixture
def rig(world, tmp_path):
    metrics = ServiceMetrics(CollectorRegistry())
    r = make_rig(world, tmp_path / "models", settings(), MetricsObserver(metrics))
    r.metrics = metrics
    for i, s in enumerate(world.source[:3]):
        r.pipeline.process(publish(r.objects, "D033", i, s.image), "D033", None)
    return r


def _label(rig, index, mask, encoding="classes", region="D033"):
    data = raster_to_geotiff_bytes(Raster(mask[None].astype(np.uint8), None, Affine.identity()))
    href = rig.objects.put(f"{region}/labels/{index}.tif", data)
    return LabelRecord(acquisition_id=f"{region}-{index:05d}", region=region, href=href, encoding=encoding).to_json()


def test_labels_are_joined_with_the_version_that_predicted_and_state_accumulates(rig, world):
    state = None
    for i, s in enumerate(world.source[:3]):
        out = rig.pipeline.process_label(_label(rig, i, s.mask), "D033", state)
        assert out.messages == ()
        state = out.state
    assert state is not None
    windows = json.loads(state)["windows"]
    assert [(w["region"], w["version"], len(w["tiles"])) for w in windows] == [("D033", 0, 3)]
    sample = rig.metrics.registry.get_sample_value
    assert sample("terradapt_labelled_tiles_total", {"region": "D033", "outcome": "joined"}) == 3
    miou = sample("terradapt_labelled_miou_ratio", {"region": "D033", "version": "0"})
    assert 0.0 < miou <= 1.0


def test_flair19_labels_are_mapped_to_the_13_classes(rig, world):
    mask = world.source[0].mask
    raw = np.where(mask == 255, 0, mask.astype(np.int64) + 1).astype(np.uint8)  # FLAIR codes 1..13, 0 = none
    cls = rig.pipeline.process_label(_label(rig, 0, world.source[0].mask), "D033", None)
    f19 = rig.pipeline.process_label(_label(rig, 0, raw, "flair19"), "D033", None)
    assert json.loads(cls.state)["windows"][0]["tiles"] == json.loads(f19.state)["windows"][0]["tiles"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [("malformed", "malformed_payload"), ("no_prediction", "missing_object"), ("wrong_shape", "invalid_tile")],
)
def test_bad_labels_are_typed_dead_letters(rig, world, case, reason):
    if case == "malformed":
        payload = b"[1, 2"
    elif case == "no_prediction":
        payload = _label(rig, 99, world.source[0].mask)
    else:
        payload = _label(rig, 0, np.zeros((8, 8), np.uint8))
    out = rig.pipeline.process_label(payload, "D033", None)
    assert [m.topic for m in out.messages] == ["deadletter"]
    letter = out.messages[0].record
    assert letter.reason == reason and letter.topic == "terradapt.labels" and letter.stage == "labels"
    assert rig.metrics.registry.get_sample_value("terradapt_dead_letters_total", {"reason": reason}) >= 1
