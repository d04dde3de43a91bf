"""bench/stream.py: the in-process rows, the memory run, the Kafka helpers and the section (no services)."""

from __future__ import annotations

from pathlib import Path

from bench import stream as bench
from bench import stream_kafka as kafka
from bench.serving import Stats
from bench.stream_report import BATCHES, MODELS, KafkaRow, KafkaRun, LatencyRun, Run, render
from stream.config import StreamConfig
from stream.scenarios import stream_item
from terradapt.classes import FLAIR_BANDS

TINY = bench.Mode(
    min_seconds=0.0, embedded_seconds=0.0, kafka_seconds=0.0, latency_seconds=0.0, memory_tiles=0, memory_regions=0
)
INFO = {"nproc": "2", "cpu": "test", "python": "3", "torch": "2", "torchserve": "0"}


def test_in_process_row_and_section(tmp_path: Path) -> None:
    built = bench.build_model(MODELS[0])
    size = 32
    calibration = bench.samples(bench.CALIBRATION_TILES, size, seed=0)
    pool = [stream_item("pool-0", i, s, FLAIR_BANDS) for i, s in enumerate(bench.samples(16, size, seed=1))]
    row = bench.measure_in_process(built, size, calibration, pool, TINY, tmp_path)
    assert set(row.forward_tps) == set(BATCHES) and min(row.forward_tps.values()) > 0
    assert row.predict_single_tps > 0 and row.predict_best_tps > 0 and row.embedded_tps > 0
    assert row.embedded_tiles == 2 * bench.EMBEDDED_REGIONS  # the least a run streams
    assert len(built.features[size]) == bench.CALIBRATION_TILES

    fwd = row.forward_best_tps
    fast = KafkaRow(row.model, size, "defaults", KafkaRun(1, 8, 8 / fwd, {"a": 8}), KafkaRun(2, 8, 4 / fwd, {}))
    slow_ms = 3 * row.predict_single.mean_ms
    fast.latency = LatencyRun(fwd / 2, 8, Stats(slow_ms / 2, slow_ms, slow_ms / 2), slow_ms)
    result = Run(INFO, "no GPU", 1, "0", "cmd", in_process=[row], kafka=[fast], variants=["defaults"])
    text = render(result)
    assert "| small | 32 | defaults | 8 | " in text
    assert "stream worker >= 0.8x bare forward" in text and "1.00x" in text  # 8 tiles in 8 / forward seconds
    assert "p99 latency <= 2x single-tile inference" in text and "3.00x" in text and "**MISSED**" in text


def test_memory_is_measured_per_checkpoint() -> None:
    result = bench.measure_memory(regions=3, tiles=30, checkpoints=[3, 15, 30])
    assert [p.tiles for p in result.points] == [3, 15, 30]
    assert [p.regions_seen for p in result.points] == [3, 3, 3]
    assert all(p.max_bytes >= p.mean_bytes > 0 for p in result.points)
    assert result.dead_letters == 0 and result.per_tile_ms > 0


def test_fresh_regions_cover_every_partition_once() -> None:
    names = kafka.RegionNames()
    first, second = names.fresh(), names.fresh()
    assert [kafka.partition_of(r) for r in first] == list(range(kafka.PARTITIONS))
    assert not set(first) & set(second)


def test_run_sizes_and_variants() -> None:
    assert kafka.tiles_for(0.0, 10.0, pool=64) == 2 * kafka.PARTITIONS
    assert kafka.tiles_for(1000.0, 10.0, pool=64) == kafka.PARTITIONS * 63
    assert kafka.tiles_for(2.0, 5.0, pool=64) % kafka.PARTITIONS == 0
    variants = kafka.variants()
    assert variants[0].env == {}
    if "batch_max_tiles" in StreamConfig.model_fields:
        assert variants[1].env == {"TERRADAPT_STREAM__BATCH_MAX_TILES": "1"}
    else:
        assert len(variants) == 1


def test_workers_never_inherit_terradapt_settings(monkeypatch) -> None:
    monkeypatch.setenv("TERRADAPT_KAFKA__BOOTSTRAP", "127.0.0.1:19092")
    monkeypatch.setenv("TERRADAPT_RUN_DIR", "/tmp/x")
    env = kafka.clean_environ()
    assert "TERRADAPT_KAFKA__BOOTSTRAP" not in env and env["TERRADAPT_RUN_DIR"] == "/tmp/x"
    ports = {int(v) for k, v in kafka.PrivateServices(Path("/tmp/unused")).script_env.items() if k.endswith("PORT")}
    assert len(ports) == 4 and not ports & kafka.RESERVED_PORTS
