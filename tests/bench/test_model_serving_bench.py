"""bench/model_serving.py: the in-process measurement, worker discovery and the section (no TorchServe)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from bench import model_serving as bench
from bench.model_serving_report import MODELS, Row, Run, _peak, render

INFO = {"nproc": "2", "cpu": "test", "python": "3", "torch": torch.__version__, "torchserve": "0"}


def test_in_process_measurement_and_section(tmp_path):
    spec = MODELS[0]
    _, params, mib = bench.build_registry(spec, tmp_path / "registry")
    tiles = bench.make_tiles(1, 64)
    measured = bench.measure_in_process(tmp_path / "registry", spec.region, tiles, "cpu", 1, 512)
    assert measured.forward.mean_ms > 0 and measured.predict.mean_ms > 0
    assert measured.rss_loaded_mib > 0 and _peak(measured) >= measured.rss_loaded_mib

    row = Row(spec, params, mib, cpu=measured)
    result = Run(rows=[row], info=INFO, gpu=bench.gpu_line(), load_before="0", load_after="0")
    args = argparse.Namespace(tiles=1, size=64, rounds=1, skip_torchserve=True)
    text = render(args, result)
    assert f"| {spec.label} | {params / 1e6:.2f} M |" in text
    assert "| n/a | n/a |" in text  # no TorchServe columns
    assert "--skip-torchserve" in text
    if not torch.cuda.is_available():
        assert "no GPU" in text


def test_worker_pids_finds_marked_descendants():
    # a stand-in worker that blocks on its stdin until killed
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "model_service_worker"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in bench.worker_pids(os.getpid())
        assert bench.proc_status_kib(child.pid, "VmRSS") > 0
    finally:
        child.kill()
        child.wait()
    assert bench.worker_pids(None) == set()
