"""Poisoned streams (issue 14.6): all-black, saturated or one repeated tile never deploy a worse version.

A region is fed nothing but poison until its monitor fires and the trigger issues a job (the trigger is told to
adapt on any drift, so adaptation is attempted whatever signal fires); the job adapts, the gate judges, the
registry records. Then the region's clean held-out labelled tiles (``world.source``: D033 tiles the source model
was neither trained nor calibrated on) measure the version it serves against the one it served before.

Before the tile-quality check (``adapters.tile_quality``, ``GateConfig.tile_quality``) every such candidate passed
the gate and was deployed: clean mIoU 0.33 -> 0.01-0.10 on black and saturated frames (bn, bn-balanced, tent,
self-training), 0.33 -> 0.20-0.29 on one repeated tile. The gate could not see it: its label-free checks compare
two models on the job's tiles, and on frames without content that comparison says nothing. The tests below assert
on what the gate did (the published version's decision and reasons, the registry's current version), and
``test_the_check_not_luck_keeps_the_harmful_candidate_out`` shows the same stream deploying the harmful candidate
when the check is switched off.

Tolerance: a deployed version may be at most ``MIOU_TOLERANCE`` (0.5 mIoU points) below the previous one on the
clean tiles, the gate's own definition of "not worse" (``GateConfig.max_miou_drop``, 0.005). Here nothing is
deployed, so the served version's mIoU is exactly the previous one's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.registry import ModelRegistry
from stream.config import Settings
from terradapt.records import AdaptationJob, DeadLetter, DriftEvent, ModelVersion
from terradapt.training import evaluate
from tests.fakes.world import Rig, World, make_rig, publish, published_job

MIOU_TOLERANCE = 0.005
REGION = "D033"
STREAM = 16  # poisoned acquisitions: the monitor fires within 8, the job follows 8 tiles later
# adapt on any drift (a repeated tile fires the deep-feature signals, not radiometry), after 8 tiles
FIRE = {"TRIGGER__MIN_TILES": "8", "TRIGGER__ADAPT_ON_LABEL_SHIFT": "true"}
TENT_HARD = {"ADAPTATION__METHOD": "tent", "ADAPTATION__EPOCHS": "5"}  # several entropy-minimisation passes


def _poison(world: World, kind: str) -> list[np.ndarray]:
    like = world.source[0].image
    if kind == "black":
        return [np.zeros_like(like) for _ in range(STREAM)]  # no nodata declared: they pass validation
    if kind == "saturated":
        return [np.full_like(like, 255) for _ in range(STREAM)]
    return [like.copy() for _ in range(STREAM)]  # one tile, re-sent


def _held_out(world: World) -> tuple[list[np.ndarray], list[np.ndarray]]:
    clean = world.source[1:]  # world.source[0] is the repeated tile
    return [s.image for s in clean], [s.mask for s in clean if s.mask is not None]


def _miou(registry: ModelRegistry, world: World, version: int) -> float:
    model, _ = registry.load(REGION, version)
    return evaluate(model, *_held_out(world)).miou


def _stream(rig: Rig, images: list[np.ndarray]) -> tuple[list[DriftEvent], list[AdaptationJob], list[ModelVersion]]:
    """Stream the images through the pipeline, running each job as the embedded runner does."""
    state = None
    drifts: list[DriftEvent] = []
    jobs: list[AdaptationJob] = []
    versions: list[ModelVersion] = []
    for i, image in enumerate(images):
        out = rig.pipeline.process(publish(rig.objects, REGION, i, image), REGION, state)
        assert not out.of(DeadLetter), out.of(DeadLetter)  # validation lets the poison in
        state = out.state if out.state is not None else state
        drifts += out.of(DriftEvent)
        for job in out.of(AdaptationJob):
            jobs.append(job)
            versions += rig.pipeline.run_job(job.to_json(), REGION).of(ModelVersion)
    return drifts, jobs, versions


def _run(world: World, root: Path, settings: Settings, images: list[np.ndarray]) -> tuple[Rig, list[ModelVersion]]:
    rig = make_rig(world, root, settings)
    drifts, jobs, versions = _stream(rig, images)
    assert drifts and len(jobs) == 1 and len(versions) == 1, (drifts, jobs, versions)  # adaptation was attempted
    return rig, versions


@pytest.mark.parametrize("method", [{}, TENT_HARD], ids=["default-method", "tent-5-epochs"])
@pytest.mark.parametrize("kind", ["black", "saturated", "repeated"])
def test_a_poisoned_region_keeps_a_version_no_worse_than_its_current_one(world, tmp_path, env, kind, method):
    before = _miou(make_rig(world, tmp_path / "before", env()).registry, world, 0)
    rig, (version,) = _run(world, tmp_path / "models", env(**FIRE, **method), _poison(world, kind))
    # what the gate did: the candidate is published, flagged, with the reason, and never served
    assert not version.accepted
    assert version.gate_reasons[0].startswith("degenerate tiles: ")
    manifest = rig.registry.manifest(REGION, version.version)
    assert not manifest.gate_accepted and manifest.gate_metrics["tiles_informative"] <= 1
    assert rig.registry.current(REGION) == 0
    after = _miou(rig.registry, world, rig.registry.current(REGION))
    assert after >= before - MIOU_TOLERANCE


def test_the_check_not_luck_keeps_the_harmful_candidate_out(world, tmp_path, env):
    """TENT, five passes over all-black frames: a candidate that loses most of the clean mIoU.

    With the check off (``TERRADAPT_ADAPTATION__GATE__TILE_QUALITY__ENABLED=false``) the rest of the gate lets it
    through and the region serves it; with the default settings the same candidate is refused.
    """
    black = _poison(world, "black")
    source = _miou(make_rig(world, tmp_path / "source", env()).registry, world, 0)
    off, (shipped,) = _run(
        world, tmp_path / "off", env(**FIRE, **TENT_HARD, ADAPTATION__GATE__TILE_QUALITY__ENABLED="false"), black
    )
    assert shipped.accepted and off.registry.current(REGION) == shipped.version
    harmful = _miou(off.registry, world, shipped.version)
    assert harmful < source - 0.1, (harmful, source)  # the gate without the check deploys real damage
    on, (refused,) = _run(world, tmp_path / "on", env(**FIRE, **TENT_HARD), black)
    assert not refused.accepted and refused.gate_reasons[0].startswith("degenerate tiles: 0 informative distinct")
    assert _miou(on.registry, world, refused.version) == pytest.approx(harmful)  # the same candidate, refused
    assert on.registry.current(REGION) == 0


# -- each setting of the check, changed through TERRADAPT_ADAPTATION__GATE__TILE_QUALITY__*, changes the decision --
OPEN_GATE = {"ADAPTATION__GATE__MAX_CLASS_TV": "1.0", "ADAPTATION__GATE__MIN_AGREEMENT": "0.0"}


def _job(rig: Rig, images: list[np.ndarray]) -> AdaptationJob:
    return published_job(rig.objects, REGION, images, job_id="adapt-poison")


def _judged(world: World, root: Path, settings: Settings, images: list[np.ndarray]) -> ModelVersion:
    """The version one job over ``images`` publishes (the pipeline's own tile screening, adaptation and gate)."""
    rig = make_rig(world, root, settings)
    (version,) = rig.pipeline.run_job(_job(rig, images).to_json(), REGION).of(ModelVersion)
    assert rig.registry.manifest(REGION, version.version).gate_metrics == version.gate_metrics
    return version


def _degenerate(version: ModelVersion) -> bool:
    return any(r.startswith("degenerate tiles") for r in version.gate_reasons)


def _clean(world: World, n: int) -> list[np.ndarray]:
    return [s.image for s in world.source[:n]]


def test_min_std_decides_what_a_flat_tile_is(world, tmp_path, env):
    grey = [np.full_like(world.source[0].image, 90 + i) for i in range(8)]  # constant fills, all different
    assert _degenerate(_judged(world, tmp_path / "a", env(**OPEN_GATE), grey))
    loose = env(**OPEN_GATE, ADAPTATION__GATE__TILE_QUALITY__MIN_STD="0")
    version = _judged(world, tmp_path / "b", loose, grey)
    assert not _degenerate(version) and version.gate_metrics["tiles_flat"] == 0


def test_max_clipped_share_decides_what_a_clipped_tile_is(world, tmp_path, env):
    clipped = []
    for image in _clean(world, 8):
        image = image.copy()
        image[:, : image.shape[1] * 3 // 4] = 0  # three quarters black in every band
        clipped.append(image)
    assert _degenerate(_judged(world, tmp_path / "a", env(**OPEN_GATE), clipped))
    loose = env(**OPEN_GATE, ADAPTATION__GATE__TILE_QUALITY__MAX_CLIPPED_SHARE="0.9")
    version = _judged(world, tmp_path / "b", loose, clipped)
    assert not _degenerate(version) and version.gate_metrics["tiles_clipped"] == 0


def test_deduplicate_decides_whether_a_repeated_tile_counts_once(world, tmp_path, env):
    repeated = [world.source[0].image.copy() for _ in range(8)]
    assert _degenerate(_judged(world, tmp_path / "a", env(**OPEN_GATE), repeated))
    version = _judged(
        world, tmp_path / "b", env(**OPEN_GATE, ADAPTATION__GATE__TILE_QUALITY__DEDUPLICATE="false"), repeated
    )
    assert not _degenerate(version) and version.gate_metrics["tiles_informative"] == 8


def test_min_informative_share_decides_when_a_mixed_job_is_usable_and_then_adapts_on_clean_tiles(world, tmp_path, env):
    black = np.zeros_like(world.source[0].image)
    mixed = _clean(world, 3) + [black.copy() for _ in range(5)]  # 3 of 8 informative
    assert _degenerate(_judged(world, tmp_path / "a", env(**OPEN_GATE), mixed))
    loose = env(**OPEN_GATE, ADAPTATION__GATE__TILE_QUALITY__MIN_INFORMATIVE_SHARE="0.25")
    rig = make_rig(world, tmp_path / "b", loose)
    (version,) = rig.pipeline.run_job(_job(rig, mixed).to_json(), REGION).of(ModelVersion)
    assert not _degenerate(version) and version.gate_metrics["tiles_informative"] == 3
    # the black frames were set aside before adapting, not only when judging
    assert rig.registry.manifest(REGION, version.version).data_window == tuple(f"{REGION}-{i:05d}" for i in range(3))
