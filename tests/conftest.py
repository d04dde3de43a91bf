"""Fixtures shared by every test module, and the hypothesis profiles of the fuzz tests.

Profiles (``TERRADAPT_HYPOTHESIS_PROFILE``): ``ci`` (the default, what ``make test`` runs) is derandomized, so
every run draws the same bounded set of examples, with a deadline per example so a hang fails rather than
stalls; ``fuzz`` (``make fuzz``) draws many more, randomly seeded (the seed of a failure is printed). Fuzz tests
size themselves with ``examples(n)``: n examples in ``ci``, scaled up in ``fuzz``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings

#: how many times more examples the fuzz profile draws than ci, per test
FUZZ_SCALE = int(os.environ.get("TERRADAPT_FUZZ_SCALE", "40"))

for name, seeded, deadline_s in (("ci", True, 5), ("fuzz", False, 15)):
    settings.register_profile(
        name,
        derandomize=seeded,
        database=None,
        deadline=timedelta(seconds=deadline_s),
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
PROFILE = os.environ.get("TERRADAPT_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """The number of examples a fuzz test draws: ``n`` in the ci profile, ``n * FUZZ_SCALE`` in fuzz."""
    return n * FUZZ_SCALE if PROFILE == "fuzz" else n


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
