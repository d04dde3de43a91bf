"""End-to-end smoke check of the local services started by deploy/local/services.sh.

Usage (from the repository root, with the project venv):
    eval "$(bash deploy/local/services.sh env)"
    .venv/bin/python deploy/local/smoke.py [kafka] [minio] [prometheus]

Kafka: creates a topic (if missing), produces one message, consumes it back.
MinIO: creates a bucket (if missing), puts and gets one object.
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
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    bootstrap = os.environ["TERRADAPT_KAFKA__BOOTSTRAP"]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="smoke-admin")
    try:
        admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
        print(f"kafka: created topic {TOPIC}")
    except TopicAlreadyExistsError:
        print(f"kafka: topic {TOPIC} already exists")
    finally:
        admin.close()

    payload = f"hello-{uuid.uuid4().hex}".encode()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    meta = producer.send(TOPIC, payload).get(timeout=30)
    producer.close()

    tp = TopicPartition(TOPIC, 0)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
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
    from minio import Minio

    client = Minio(
        os.environ["TERRADAPT_S3__ENDPOINT"],
        access_key=os.environ["TERRADAPT_S3__ACCESS_KEY"],
        secret_key=os.environ["TERRADAPT_S3__SECRET_KEY"],
        secure=os.environ.get("TERRADAPT_S3__SECURE", "false").lower() == "true",
    )
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
