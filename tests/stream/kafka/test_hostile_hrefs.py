"""Hostile hrefs on the real broker and MinIO: the worker reads only what the href policy allows.

Anyone who can publish on the acquisitions topic chooses the href; the worker must not read local files, other
buckets, devices, or anything larger than the limit, and must keep going after each refusal.
"""

from __future__ import annotations

import json

import pytest

from stream.kafka.ingest import acquisition_for

pytestmark = pytest.mark.services


def test_refused_hrefs_are_dead_lettered_with_the_reason_and_a_rooted_file_is_predicted(tmp_path, make_stack, tiles):
    root = tmp_path / "acquisitions"
    (root / "D033").mkdir(parents=True)
    good = tiles["D033"][0].read_bytes()
    (root / "D033" / "good.tif").write_bytes(good)
    (root / "D033" / "escape.tif").symlink_to("/etc/passwd")
    (tmp_path / "outside.tif").write_bytes(good)
    stack = make_stack({"TERRADAPT_STREAM__FILE_ROOT": str(root), "TERRADAPT_STREAM__MAX_TILE_BYTES": "2000000"})
    # objects the worker must not read: a model bucket object, and an acquisition too big for the limit
    stack.models.put("D033/secret.tif", good, "image/tiff")
    stack.acquisitions.put("D033/huge.tif", b"\0" * 2_500_000, "image/tiff")
    bucket = stack.settings.s3.bucket_acquisitions
    cases = {
        "forbidden_href": [
            "file:///etc/passwd",
            "file:///dev/zero",
            f"file://{root}/../outside.tif",
            f"file://{root}/D033/escape.tif",
            f"file://{root}/D033",
            f"s3://{stack.settings.s3.bucket_models}/D033/secret.tif",
            "http://169.254.169.254/latest/meta-data/",
            "/etc/shadow",
        ],
        "oversized_tile": [f"s3://{bucket}/D033/huge.tif"],
    }
    payloads: dict[str, str] = {}
    for reason, hrefs in cases.items():
        for href in hrefs:
            raw = acquisition_for(good, "D033", href).to_json()
            payloads[raw.decode()] = reason
            stack.send_raw("D033", raw)
    ok = acquisition_for(good, "D033", f"file://{root}/D033/good.tif")
    stack.send_raw("D033", ok.to_json())
    stack.start("worker", "worker")
    # the good one is behind every hostile one on the same partition: once it is predicted, all were handled
    preds = stack.wait_for("predictions", lambda m: any(p["acquisition_id"] == ok.id for p in m), timeout_s=180)
    letters = {x["payload"]: x for x in stack.wait_for("deadletter", lambda m: len(m) >= len(payloads))}
    assert {p: letters[p]["reason"] for p in payloads} == payloads
    for payload, reason in payloads.items():
        if reason == "forbidden_href":  # the error names the refused href
            assert json.loads(payload)["assets"]["data"]["href"] in letters[payload]["error"]
    assert [p["acquisition_id"] for p in preds] == [ok.id]
    assert stack.procs["worker"].poll() is None  # still running
