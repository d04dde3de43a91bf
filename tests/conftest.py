"""Fixtures shared by every test module."""

from __future__ import annotations

import signal
import subprocess

import pytest


@pytest.fixture
def processes():
    """Processes started by the test, stopped at the end whatever happens (by their own pid)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
