"""Every setting family takes effect: changed through ``TERRADAPT_*``, it changes what the pipeline does.

Each test loads settings from the environment exactly as the workers and the demo do (``load_settings``), builds
the pipeline from them (``stream.build``), drives real messages through it and checks the behaviour, not the
parsed value.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from monitoring.detectors import KernelMMDDetector, MeanShiftDetector
from monitoring.metrics import ServiceMetrics
from serving.predictor import InProcessPredictor
from stream.build import predictor_and_deployer
from stream.observer import MetricsObserver
from stream.pipeline import Pipeline
from stream.scenarios import scenario
from terradapt.records import DeadLetter, ModelVersion, TilePrediction
from tests.fakes.world import make_rig, publish


def _stream(pipeline: Pipeline, objects, region, samples, start=0):
    """Process samples in order; return every outcome."""
    state, outs = None, []
    for i, s in enumerate(samples, start):
        out = pipeline.process(publish(objects, region, i, s.image), region, state)
        state = out.state if out.state is not None else state
        outs.append(out)
    return outs


def _sample(metrics: ServiceMetrics, name: str, labels: dict[str, str]) -> float:
    """A sample that must exist."""
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def _first(outs, topic):
    return next((i for i, o in enumerate(outs) if o.records(topic)), None)


# -- monitor -------------------------------------------------------------------------------------------------
def test_monitor_ert_changes_the_thresholds_the_stream_is_judged_with(world, tmp_path, env):
    thresholds = {}
    for ert in ("1000", "5000"):
        metrics = ServiceMetrics(CollectorRegistry())
        rig = make_rig(world, tmp_path / ert, env(MONITOR__ERT=ert), MetricsObserver(metrics))
        _stream(rig.pipeline, rig.objects, "D033", world.source[:2])
        thresholds[ert] = {
            s: _sample(metrics, "terradapt_drift_threshold", {"region": "D033", "signal": s})
            for s in ("radiometry", "deep", "batchnorm", "prediction")
        }
    assert all(thresholds["5000"][s] > thresholds["1000"][s] > 0 for s in thresholds["1000"])


def test_monitor_window_changes_when_the_first_test_runs(world, tmp_path, env):
    first_score = {}
    for window in (4, 8):
        rig = make_rig(world, tmp_path / str(window), env(MONITOR__DETECTOR_CONFIG=json.dumps({"window": window})))
        state = None
        for i, s in enumerate(world.source[:10]):
            state = rig.pipeline.process(publish(rig.objects, "D033", i, s.image), "D033", state).state
            monitor = rig.pipeline.load_state(state).monitor
            if any(d.score for d in monitor.detectors.values()) and window not in first_score:
                first_score[window] = i + 1
    assert first_score == {4: 4, 8: 8}


def test_monitor_per_signal_detector_and_its_own_ert_are_used(world, tmp_path, env):
    per_signal = {"deep": {"detector": "kernel-mmd", "config": {"ert": 20000, "reference_size": 32}}}
    rig = make_rig(world, tmp_path, env(MONITOR__PER_SIGNAL=json.dumps(per_signal)))
    out = _stream(rig.pipeline, rig.objects, "D033", world.source[:9])[-1]
    monitor = rig.pipeline.load_state(out.state).monitor  # the state the stream produced, on this config
    assert isinstance(monitor.detectors["deep"], KernelMMDDetector)
    assert monitor.detectors["deep"].config.ert == 20000  # its own ERT, not the monitor's share
    assert isinstance(monitor.detectors["radiometry"], MeanShiftDetector)
    assert monitor.detectors["radiometry"].config.ert == 4000  # monitor.ert (1000) x 4 signals
    assert monitor.detectors["deep"].score > 0


# -- trigger and stream buffers --------------------------------------------------------------------------------
def test_trigger_min_tiles_and_buffer_tiles_change_when_and_on_what_a_job_is_issued(world, tmp_path, env):
    default = make_rig(world, tmp_path / "a", env())
    early = make_rig(world, tmp_path / "b", env(TRIGGER__MIN_TILES="4", STREAM__BUFFER_TILES="6"))
    outs_default = _stream(default.pipeline, default.objects, "D013", world.shifted[:30])
    outs_early = _stream(early.pipeline, early.objects, "D013", world.shifted[:30])
    detected = _first(outs_default, "drift_events")
    assert detected is not None and detected == _first(outs_early, "drift_events")
    assert _first(outs_default, "adaptation_jobs") == detected + 15  # 16 tiles since the detection
    assert _first(outs_early, "adaptation_jobs") == detected + 3  # 4 tiles since the detection
    job = outs_early[detected + 3].records("adaptation_jobs")[0]
    assert len(job.tile_ids) == 4
    later = next(o.records("adaptation_jobs")[0] for o in outs_default if o.records("adaptation_jobs"))
    assert len(later.tile_ids) == 16


def test_stream_contract_settings_refuse_tiles(world, tmp_path, env):
    rig = make_rig(world, tmp_path / "a", env(STREAM__REGIONS='["D033"]'))
    letter = rig.pipeline.process(publish(rig.objects, "D013", 0, world.shifted[0].image), "D013", None).messages[0]
    assert isinstance(letter.record, DeadLetter)
    assert letter.record.reason == "unknown_region"
    rig = make_rig(world, tmp_path / "b", env(STREAM__MAX_TILE_BYTES="2000"))
    out = rig.pipeline.process(publish(rig.objects, "D033", 0, world.source[0].image), "D033", None)
    record = out.messages[0].record
    assert isinstance(record, DeadLetter)
    assert record.reason == "oversized_tile"
    rig = make_rig(world, tmp_path / "d", env(STREAM__MAX_DECODED_BYTES="4096"))
    out = rig.pipeline.process(publish(rig.objects, "D033", 0, world.source[0].image), "D033", None)
    record = out.messages[0].record
    assert isinstance(record, DeadLetter)
    assert record.reason == "oversized_tile" and "decoded_bytes" in record.error
    rig = make_rig(world, tmp_path / "c", env(STREAM__BAND_COUNT="4"))
    out = rig.pipeline.process(publish(rig.objects, "D033", 0, world.source[0].image), "D033", None)
    record = out.messages[0].record
    assert isinstance(record, DeadLetter)
    assert record.reason == "invalid_tile"


def test_label_window_bounds_the_accuracy_window(world, tmp_path, env):
    from tests.stream.test_pipeline_labels import _label

    rig = make_rig(world, tmp_path, env(STREAM__LABEL_WINDOW="2"))
    _stream(rig.pipeline, rig.objects, "D033", world.source[:3])
    state = None
    for i, s in enumerate(world.source[:3]):
        state = rig.pipeline.process_label(_label(rig, i, s.mask), "D033", state).state
    assert state is not None
    assert [len(w["tiles"]) for w in json.loads(state)["windows"]] == [2]


# -- adaptation: method per region, its config, the gate, the reset ----------------------------------------------
def _job_payload(rig, world, n=12):
    outs = _stream(rig.pipeline, rig.objects, "D013", world.shifted[:40])
    jobs = [o.records("adaptation_jobs")[0] for o in outs if o.records("adaptation_jobs")]
    assert jobs, "the shifted region issued no job"
    return jobs[0].to_json()


def test_adaptation_method_and_config_per_region_reach_the_published_version(world, tmp_path, env):
    per_region = {"D013": {"method": "tent", "method_config": {"lr": 0.01, "steps": 2}}}
    rig = make_rig(world, tmp_path / "a", env(ADAPTATION__PER_REGION=json.dumps(per_region)))
    payload = _job_payload(rig, world)
    version = rig.pipeline.run_job(payload, "D013").of(ModelVersion)[0]
    assert version.method == "tent"
    tent = rig.registry.load("D013", version.version)[0].state_dict()
    still = make_rig(
        world,
        tmp_path / "b",
        env(ADAPTATION__PER_REGION=json.dumps({"D013": {"method": "tent", "method_config": {"lr": 1e-12}}})),
    )
    v2 = still.pipeline.run_job(_job_payload(still, world), "D013").of(ModelVersion)[0]
    frozen = still.registry.load("D013", v2.version)[0].state_dict()
    source = world.model.state_dict()
    moved = max(float((tent[k] - source[k]).abs().max()) for k in source if k.endswith("weight"))
    barely = max(float((frozen[k] - source[k]).abs().max()) for k in source if k.endswith("weight"))
    assert moved > 100 * max(barely, 1e-9)


def test_gate_thresholds_decide_whether_a_version_ships(world, tmp_path, env):
    default = make_rig(world, tmp_path / "a", env())
    strict = make_rig(world, tmp_path / "b", env(ADAPTATION__GATE__MIN_ENTROPY_RATIO="0.9"))
    shipped = default.pipeline.run_job(_job_payload(default, world), "D013")
    refused = strict.pipeline.run_job(_job_payload(strict, world), "D013")
    assert shipped.of(ModelVersion)[0].accepted and shipped.records("rollouts")
    assert not refused.of(ModelVersion)[0].accepted and not refused.records("rollouts")
    assert "entropy collapse" in refused.of(ModelVersion)[0].gate_reasons[0]


@pytest.fixture(scope="module")
def selection_rows(world):
    """Label-free selection domains of the world's calibration tiles (two tuning shifts, the default method)."""
    from adapters.selection_calibration import TUNING_SHIFTS, calibrate_selection

    cal = world.calibration
    domains = calibrate_selection(
        world.model,
        world.manifest,
        [s.image for s in cal],
        [s.mask for s in cal if s.mask is not None],
        [s.region for s in cal],
        methods=("bn-balanced",),
        shifts={k: TUNING_SHIFTS[k] for k in ("none", "darker", "haze")},
        tiles_per_domain=8,
    )
    return tuple(d.model_dump() for d in domains)


def _with_selection(rig, rows):
    calibration = rig.registry.calibration().model_copy(update={"selection": rows})
    rig.registry.publish_calibration(calibration)
    return rig


def test_selection_settings_decide_whether_the_estimator_judges_and_how_sure_it_must_be(
    world, tmp_path, env, selection_rows
):
    judged = _with_selection(make_rig(world, tmp_path / "a", env()), selection_rows)
    strict = _with_selection(
        make_rig(world, tmp_path / "b", env(ADAPTATION__GATE__SELECTION__MIN_GAIN="0.9")), selection_rows
    )
    off = _with_selection(
        make_rig(world, tmp_path / "c", env(ADAPTATION__GATE__SELECTION__ENABLED="false")), selection_rows
    )
    v_judged = judged.pipeline.run_job(_job_payload(judged, world), "D013").of(ModelVersion)[0]
    v_strict = strict.pipeline.run_job(_job_payload(strict, world), "D013").of(ModelVersion)[0]
    v_off = off.pipeline.run_job(_job_payload(off, world), "D013").of(ModelVersion)[0]
    assert "estimated_gain" in v_judged.gate_metrics and "estimated_gain" not in v_off.gate_metrics
    assert v_strict.gate_metrics["estimate_margin"] == pytest.approx(0.9)
    assert not v_strict.accepted and any("estimated mIoU change" in r for r in v_strict.gate_reasons)
    quantile = _with_selection(
        make_rig(world, tmp_path / "d", env(ADAPTATION__GATE__SELECTION__MARGIN_QUANTILE="1.0")), selection_rows
    )
    v_q = quantile.pipeline.run_job(_job_payload(quantile, world), "D013").of(ModelVersion)[0]
    assert v_q.gate_metrics["estimate_margin"] > v_judged.gate_metrics["estimate_margin"]


def test_adaptation_reset_policy_sends_the_adapter_back_to_source(world, tmp_path, env):
    rig = make_rig(world, tmp_path, env(ADAPTATION__RESET='{"period": 1}'))  # reset after every batch
    version = rig.pipeline.run_job(_job_payload(rig, world), "D013").of(ModelVersion)[0]
    adapted = rig.registry.load("D013", version.version)[0].state_dict()
    assert all(torch.equal(v, world.model.state_dict()[k]) for k, v in adapted.items())


# -- runtime, predictor and deployer ---------------------------------------------------------------------------
def test_runtime_window_tiles_large_acquisitions_and_a_bad_combination_fails_at_start(world, tmp_path, env):
    rig = make_rig(world, tmp_path, env(RUNTIME__WINDOW="32", RUNTIME__OVERLAP="8", RUNTIME__BATCH_SIZE="2"))
    predictor = rig.pipeline.predictor
    assert isinstance(predictor, InProcessPredictor)
    assert (predictor.window, predictor.overlap, predictor.batch_size) == (32, 8, 2)
    out = rig.pipeline.process(publish(rig.objects, "D033", 0, world.source[0].image), "D033", None)
    assert out.of(TilePrediction)[0].model_version == 0  # a 64 px tile predicted through 32 px windows
    with pytest.raises(ValueError, match="MODEL_STORE"):
        predictor_and_deployer(env(RUNTIME__PREDICTOR="torchserve"), rig.registry)


def test_demo_section_chooses_the_scenario(env):
    settings = env(
        DEMO__TILE_SIZE="64",
        DEMO__TRAIN_TILES="4",
        DEMO__CALIBRATION_TILES="8",
        DEMO__STREAM_TILES="8",
        DEMO__EVAL_TILES="1",
    )
    sc = scenario(settings.demo)
    assert sc.train[0].image.shape[1:] == (64, 64) and len(sc.train) == 8
    assert {len(v) for v in sc.streams.values()} == {8}


def test_demo_arch_chooses_the_source_architecture(env, tmp_path):
    from stream.scenarios import source_model

    small = {"DEMO__TILE_SIZE": "64", "DEMO__TRAIN_TILES": "4", "DEMO__CALIBRATION_TILES": "8"}
    small |= {"DEMO__STREAM_TILES": "8", "DEMO__EVAL_TILES": "1", "DEMO__TRAIN_STEPS": "1"}
    small |= {"DEMO__CACHE_DIR": str(tmp_path / "cache")}
    default = env(**small)
    _, manifest, _ = source_model(default.demo, scenario(default.demo), device="cpu")
    assert manifest.architecture == "unet"
    chosen = env(DEMO__ARCH="smp:FPN:resnet18", **small)
    model, manifest, cached = source_model(chosen.demo, scenario(chosen.demo), device="cpu")
    assert (manifest.architecture, manifest.config["arch"], manifest.config["encoder"]) == ("smp", "FPN", "resnet18")
    assert not cached and model.feature_dim == 512  # its own cache entry, not the small model's
    with pytest.raises(ValueError, match="smp:<Arch>:<encoder>"):
        env(DEMO__ARCH="resnet")


# -- where acquisitions may come from, storage outages ---------------------------------------------------------
def test_href_policy_settings_decide_what_a_worker_may_read(env, tmp_path):
    from types import SimpleNamespace

    from serving.hrefs import HrefReader
    from stream.kafka.services import href_policy
    from terradapt.errors import ForbiddenHrefError

    tile = tmp_path / "tiles" / "a.tif"
    tile.parent.mkdir()
    tile.write_bytes(b"12345678")

    class Client:
        def stat_object(self, bucket, key):
            return SimpleNamespace(size=8)

        def get_object(self, bucket, key):
            return SimpleNamespace(stream=lambda n: iter([b"12345678"]), close=lambda: None, release_conn=lambda: None)

    def reads(settings, href):
        try:
            return HrefReader(Client(), href_policy(settings)).get(href) == b"12345678"
        except ForbiddenHrefError:
            return False

    default = env(S3__BUCKET_ACQUISITIONS="acq")
    assert reads(default, "s3://acq/D033/a.tif") and not reads(default, "s3://other/D033/a.tif")
    assert not reads(default, tile.as_uri())
    widened = env(S3__BUCKET_ACQUISITIONS="acq", STREAM__ALLOWED_BUCKETS='["other"]')
    assert reads(widened, "s3://other/D033/a.tif") and not reads(widened, "s3://acq/D033/a.tif")
    rooted = env(STREAM__FILE_ROOT=str(tmp_path / "tiles"))
    assert reads(rooted, tile.as_uri())
    assert not reads(env(STREAM__FILE_ROOT=str(tmp_path / "elsewhere")), tile.as_uri())


def test_storage_retry_deadline_decides_how_long_an_outage_is_ridden_out(env):
    import dataclasses

    from serving.codec import StorageError
    from stream.kafka.services import storage_retry

    def survives(settings, outage_s: float) -> bool:
        now = [0.0]
        policy = dataclasses.replace(
            storage_retry(settings), sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0]
        )

        def call() -> str:
            if now[0] < outage_s:
                raise ConnectionRefusedError("minio restarting")
            return "ok"

        try:
            return policy.call("get x", call) == "ok"
        except StorageError:
            return False

    assert survives(env(), 60.0)  # default: two minutes
    assert not survives(env(STREAM__STORAGE_RETRY_S="10"), 60.0)
    assert survives(env(STREAM__STORAGE_RETRY_S="10"), 5.0)


def test_runtime_workdir_holds_the_stream_workers_files(env, tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry as Registry

    from stream.kafka.services import Services
    from stream.kafka.worker import create_app
    from stream.topics import Topics

    monkeypatch.chdir(tmp_path)  # faust's default would be "<app>-data" in the working folder

    calls = SimpleNamespace(process_many=list, process_label=list)  # the app only names them

    def app_for(settings):
        services = Services(settings, calls, Topics.with_prefix("t."), ServiceMetrics(Registry()))  # type: ignore[arg-type]
        return create_app(services)

    default = app_for(env())
    assert default.conf.tabledir.resolve().is_relative_to((tmp_path / ".terradapt").resolve())
    moved = app_for(env(RUNTIME__WORKDIR=str(tmp_path / "state")))
    assert moved.conf.tabledir.resolve().is_relative_to((tmp_path / "state" / "faust").resolve())
    assert moved.conf.name in str(moved.conf.tabledir)
    assert (tmp_path / "state" / "faust").is_dir()  # faust creates only the app's own folder at start


def test_runtime_torch_threads_sets_the_threads_a_pipeline_computes_with(env, world, tmp_path):
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            make_rig(world, tmp_path / str(threads), env(RUNTIME__TORCH_THREADS=str(threads)))
            assert torch.get_num_threads() == threads
        torch.set_num_threads(3)
        make_rig(world, tmp_path / "default", env())  # 0: left as it was
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
