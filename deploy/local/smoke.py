"""End-to-end smoke check of the local services started by deploy/local/services.sh.

Usage (from the repository root, with the project venv):
    eval "$(bash deploy/local/services.sh env)"
    .venv/bin/python deploy/local/smoke.py [kafka] [minio] [prometheus]

Kafka: creates a topic (if missing), produces one message, consumes it back.
MinIO: creates a bucket (if missing), puts and gets one object.
Clients are built from the TERRADAPT_* settings the way the workers build them, so a secured broker
(TERRADAPT_KAFKA_SECURE=1: SASL_SSL + SCRAM) and a TLS MinIO (TERRADAPT_MINIO_TLS=1) are checked too.
Prometheus: waits until the `up` query returns a sample.
A marker written by a previous run is reported (shows that data survived a restart).
Exits non-zero on the first failure.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import urllib.parse
import urllib.request
import uuid

TOPIC = "terradapt-smoke"
BUCKET = "terradapt-smoke"


def check_kafka() -> None:
    """Create the smoke topic, produce one message and read it back."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from stream.config import load_settings
    from stream.kafka.security import client_options

    config = load_settings().kafka
    options = client_options(config)
    print(f"kafka: {config.bootstrap} over {config.security_protocol}")
    admin = KafkaAdminClient(**options, client_id="smoke-admin")
    try:
        admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
        print(f"kafka: created topic {TOPIC}")
    except TopicAlreadyExistsError:
        print(f"kafka: topic {TOPIC} already exists")
    finally:
        admin.close()

    payload = f"hello-{uuid.uuid4().hex}".encode()
    producer = KafkaProducer(**options)
    meta = producer.send(TOPIC, payload).get(timeout=30)
    producer.close()

    tp = TopicPartition(TOPIC, 0)
    consumer = KafkaConsumer(**options, enable_auto_commit=False)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while payload not in values and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            values.extend(r.value for r in records)
    consumer.close()
    if payload not in values:
        raise SystemExit(f"kafka: produced {payload!r} at offset {meta.offset} but did not read it back")
    print(f"kafka: produced+consumed at offset {meta.offset}; {len(values)} message(s) in topic (earlier runs kept)")


def check_minio() -> None:
    """Create the smoke bucket, put one object and get it back."""
    from serving.minio_store import minio_client
    from stream.config import load_settings

    config = load_settings().s3
    print(f"minio: {'https' if config.secure else 'http'}://{config.endpoint}")
    client = minio_client(config)
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
        print(f"minio: created bucket {BUCKET}")
    previous = [o.object_name for o in client.list_objects(BUCKET, prefix="run-")]
    data = f"object-{uuid.uuid4().hex}".encode()
    name = f"run-{int(time.time() * 1000)}.txt"
    client.put_object(BUCKET, name, io.BytesIO(data), length=len(data))
    resp = client.get_object(BUCKET, name)
    try:
        got = resp.read()
    finally:
        resp.close()
        resp.release_conn()
    if got != data:
        raise SystemExit("minio: object read back differs")
    print(f"minio: put+get {BUCKET}/{name} ok; {len(previous)} object(s) from earlier runs")


def check_prometheus() -> None:
    """Wait until Prometheus answers the ``up`` query with a sample."""
    base = os.environ["TERRADAPT_PROMETHEUS__URL"]
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": "up"})
    deadline = time.monotonic() + 30
    t0 = time.monotonic()
    while True:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        result = body.get("data", {}).get("result", [])
        if body.get("status") == "success" and result:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"prometheus: no sample for 'up' after 30s: {body}")
        time.sleep(0.5)
    samples = {r["metric"].get("job"): r["value"][1] for r in result}
    print(f"prometheus: up = {samples} (first sample after {time.monotonic() - t0:.1f}s)")


CHECKS = {"kafka": check_kafka, "minio": check_minio, "prometheus": check_prometheus}


def main(argv: list[str]) -> int:
    """Run the named checks (all by default); 0 when every one passed."""
    names = argv or list(CHECKS)
    for name in names:
        if name not in CHECKS:
            print(f"unknown check {name!r}; choose from {sorted(CHECKS)}", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        CHECKS[name]()
        print(f"  ({time.monotonic() - t0:.2f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
