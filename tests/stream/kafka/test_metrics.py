"""A real Prometheus scrapes the real Kafka workers during a short run; every dashboard and alert query has data.

Also the delayed-label path on Kafka: masks published on the labels topic after the acquisitions are joined with
the stored predictions (whatever version made them) and show up as per-region, per-version accuracy.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime

import pytest

from terradapt.capture_time import CaptureTimes
from terradapt.records import LabelRecord
from tests.monitoring.test_prometheus import (
    PROM_DIR,
    PROMETHEUS,
    Prom,
    free_port,
    queries_without_data,
    wait_for,
)

pytestmark = pytest.mark.services


def _mask_of(image_path):
    return image_path.parent.parent / "msk" / image_path.name.replace("IMG_", "MSK_")


def test_prometheus_scrapes_the_kafka_workers_and_every_query_has_data(make_stack, tiles, tmp_path, processes):
    assert PROMETHEUS, "prometheus not installed: make test installs it (deploy/local/services.sh install)"
    stack = make_stack()
    worker_port, adapt_port = free_port(), free_port()
    stack.start("worker", "worker", {"TERRADAPT_METRICS__PORT": str(worker_port)})
    stack.start("adapt", "adapt-worker", {"TERRADAPT_METRICS__PORT": str(adapt_port)})

    prom_dir = tmp_path / "prometheus"
    (prom_dir / "targets").mkdir(parents=True)
    shutil.copy(PROM_DIR / "prometheus.yml", prom_dir)
    shutil.copy(PROM_DIR / "alerts.yml", prom_dir)
    targets = [f"127.0.0.1:{worker_port}", f"127.0.0.1:{adapt_port}"]
    (prom_dir / "targets" / "kafka.json").write_text(json.dumps([{"targets": targets, "labels": {"runner": "kafka"}}]))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        import subprocess

        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={prom_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    processes.append(proc)
    prom = Prom(f"http://127.0.0.1:{port}")
    wait_for(lambda: prom.client.get("/-/ready").status_code == 200, 30, "prometheus ready", proc, log)

    d033, d013 = tiles["D033"][:12], tiles["D013"][:28]  # detection + 16 tiles since: one job
    flown = CaptureTimes(fixed=datetime(2021, 6, 14, 10, 22, tzinfo=UTC))  # capture time: the acquisition-time panel
    acqs = stack.ingest(d033, "D033", flown) + stack.ingest(d013, "D013", flown)
    stack.send_raw("D033", b"{not a stac item")  # one dead letter
    ids = {a.id for a in acqs}
    stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= ids, timeout_s=240)
    stack.wait_for("model_versions", lambda m: len(m) >= 1, timeout_s=120)
    # D013 tiles predicted by the adapted version, so its accuracy series exists too
    late = stack.ingest(tiles["D013"][28:42], "D013", flown)
    stack.wait_for("predictions", lambda m: {p["acquisition_id"] for p in m} >= {a.id for a in late}, timeout_s=240)

    # delayed labels: every acquisition's FLAIR mask, published after the fact
    for acq, path in zip(acqs + late, d033 + d013 + tiles["D013"][28:42], strict=True):
        href = stack.acquisitions.put(f"{acq.region}/labels/{acq.id}.tif", _mask_of(path).read_bytes())
        record = LabelRecord(acquisition_id=acq.id, region=acq.region, href=href, encoding="flair19")
        stack.producer.send(stack.topics.labels, key=acq.region.encode(), value=record.to_json()).get(timeout=30)

    def target_up() -> bool:
        active = prom.get("/api/v1/targets")["activeTargets"]
        up: int = sum(t["health"] == "up" for t in active if t["labels"]["job"] == "terradapt")
        return up == 2

    wait_for(target_up, 60, "both workers scraped", proc, log)

    missing = queries_without_data(prom, timeout_s=120)
    assert not missing, "queries without data:\n" + "\n".join(missing)

    # the numbers: every acquisition counted once as ok (replays aside, none here), the label joins per version
    assert prom.value('sum(terradapt_tiles_processed_total{outcome="ok"})') == len(ids) + len(late)
    assert prom.value('sum(terradapt_dead_letters_total{reason="malformed_payload"})') == 1
    assert prom.value('max(terradapt_model_current_version{region="D013"})') == 1
    miou = {
        r["metric"]["version"]: float(r["value"][1]) for r in prom.query('terradapt_labelled_miou_ratio{region="D013"}')
    }
    assert set(miou) == {"0", "1"}, miou
    assert miou["1"] > miou["0"], miou
