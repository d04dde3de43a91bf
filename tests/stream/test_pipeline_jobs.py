"""``Pipeline.run_job``: what the adaptation worker runs for each job message (unit tests, no broker).

Idempotent per job id, stale jobs ignored, unreadable tiles skipped, a crash between publish and rollout
recovered by the redelivered job, and the rollout gets the same gate inputs the in-process gate had.
"""

import pytest

from serving.rollout import InProcessDeployer, RolloutContext
from terradapt.records import ModelVersion, RolloutStep
from tests.fakes.world import make_rig, published_job, settings

OPEN_GATE = {"gate": {"max_class_tv": 1.0, "min_agreement": 0.0}}  # the toy model is weak: let bn through


class RecordingDeployer(InProcessDeployer):
    """The in-process deployer, remembering the context of every rollout (or failing when told to)."""

    def __init__(self, registry, fail=False):
        super().__init__(registry)
        self.contexts: list[RolloutContext] = []
        self.fail = fail

    def rollout(self, region, version, context=None):
        if self.fail:
            raise ConnectionError("TorchServe went away")
        self.contexts.append(context)
        return super().rollout(region, version, context)


def _job(rig, world, job_id="adapt-1", base=0, n=12, covariate=True):
    images = [s.image for s in world.shifted[:n]]
    return published_job(rig.objects, "D013", images, job_id=job_id, base_version=base, covariate=covariate)


@pytest.fixture
def rig(world, tmp_path):
    r = make_rig(world, tmp_path / "models", settings(adaptation=OPEN_GATE))
    r.pipeline.deployer = RecordingDeployer(r.registry)
    return r


def test_job_publishes_rolls_out_and_hands_the_gate_context_to_the_deployer(rig, world):
    out = rig.pipeline.run_job(_job(rig, world).to_json(), "D013")
    assert [m.topic for m in out.messages] == ["model_versions", "rollouts"]
    version = out.records("model_versions")[0]
    assert version.accepted and version.version == 1 and rig.registry.current("D013") == 1
    assert out.records("rollouts")[0].step == RolloutStep.PROMOTED
    (context,) = rig.pipeline.deployer.contexts
    assert len(context.tiles) == 12 and context.gate.covariate
    assert context.gate.label_shift is not None and context.gate.prior == world.manifest.class_prior
    manifest = rig.registry.manifest("D013", 1)
    assert manifest.gate_metrics["tv_reference_to_prior"] >= 0  # the in-process gate judged with the same estimate


def test_the_same_job_twice_registers_one_version(rig, world):
    payload = _job(rig, world).to_json()
    rig.pipeline.run_job(payload, "D013")
    again = rig.pipeline.run_job(payload, "D013")
    assert [m.topic for m in again.messages] == ["model_versions"]  # republished, not rolled out twice
    assert [m.version for m in rig.registry.history("D013")] == [1]


def test_crash_between_publish_and_rollout_is_finished_by_the_redelivered_job(rig, world):
    payload = _job(rig, world).to_json()
    rig.pipeline.deployer.fail = True
    crashed = rig.pipeline.run_job(payload, "D013")
    assert crashed.messages[0].record.reason == "adaptation_failed"
    assert rig.registry.current("D013") == 0 and [m.version for m in rig.registry.history("D013")] == [1]
    rig.pipeline.deployer.fail = False
    again = rig.pipeline.run_job(payload, "D013")
    assert [m.topic for m in again.messages] == ["model_versions", "rollouts"]
    assert rig.registry.current("D013") == 1 and len(rig.registry.history("D013")) == 1


def test_stale_job_does_nothing(rig, world):
    rig.pipeline.run_job(_job(rig, world, "first").to_json(), "D013")
    stale = rig.pipeline.run_job(_job(rig, world, "second", base=0).to_json(), "D013")
    assert stale.messages == () and len(rig.registry.history("D013")) == 1


def test_unreadable_tiles_are_skipped_and_no_tile_at_all_is_a_dead_letter(rig, world):
    job = _job(rig, world, n=10)
    for i in range(3):
        rig.objects.delete(f"D013/D013-{i:05d}.tif")  # expired objects
    out = rig.pipeline.run_job(job.to_json(), "D013")
    assert rig.registry.manifest("D013", 1).data_window == job.tile_ids[3:]
    assert out.messages[0].topic == "model_versions"
    for i in range(10):
        rig.objects.delete(f"D013/D013-{i:05d}.tif")
    none = rig.pipeline.run_job(job.model_copy(update={"job_id": "other", "base_version": 1}).to_json(), "D013")
    assert none.messages[0].record.reason == "no_tiles"


def test_malformed_and_misrouted_jobs_are_dead_letters(rig, world):
    assert rig.pipeline.run_job(b"{", "D013").messages[0].record.reason == "malformed_payload"
    wrong_key = rig.pipeline.run_job(_job(rig, world).to_json(), "D033")
    assert wrong_key.messages[0].record.reason == "key_mismatch"


def test_a_rejected_candidate_is_published_flagged_and_never_deployed(world, tmp_path):
    # bn lowers this toy's mean entropy to ~0.6x the source's: a gate asking for 0.9x refuses it
    rig = make_rig(world, tmp_path / "m", settings(adaptation={"gate": {"min_entropy_ratio": 0.9}}))
    out = rig.pipeline.run_job(_job(rig, world).to_json(), "D013")
    assert [m.topic for m in out.messages] == ["model_versions"]
    version = out.of(ModelVersion)[0]
    assert not version.accepted and "entropy collapse" in version.gate_reasons[0]
    assert rig.registry.current("D013") == 0
