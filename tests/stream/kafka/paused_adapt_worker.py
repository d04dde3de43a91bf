"""The real adaptation worker, paused between publishing a version and rolling it out (a deterministic kill point).

``python -m tests.stream.kafka.paused_adapt_worker`` runs what ``terradapt adapt-worker`` runs, except that its
deployer, when asked to roll a version out, first writes ``$TERRADAPT_TEST_PAUSE_MARKER`` (the version is
published by then: ``Pipeline.run_job`` publishes before it deploys) and then blocks forever. A test waits for the
marker (an event, not a delay), SIGKILLs the process and starts the normal adapt-worker on the same stack.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from serving.rollout import Deployer, RolloutContext
from terradapt.records import RolloutEvent

MARKER_ENV = "TERRADAPT_TEST_PAUSE_MARKER"


class PausingDeployer:
    """A ``Deployer`` that announces the rollout it was asked for, then never returns from it."""

    def __init__(self, inner: Deployer, marker: Path) -> None:
        self.inner = inner
        self.marker = marker

    def rollout(self, region: str, version: int, context: RolloutContext | None = None) -> RolloutEvent:
        """Write the marker (region, version), then block until the process is killed."""
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"region": region, "version": version}))
        tmp.replace(self.marker)  # atomic: the test never reads half a marker
        threading.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover

    def rollback(self, region: str) -> RolloutEvent:
        """Delegate (never reached in the tests that use this worker)."""
        return self.inner.rollback(region)


def main() -> None:
    """Build the services like ``terradapt adapt-worker`` and run its loop with the pausing deployer."""
    from stream.config import load_settings
    from stream.kafka.adapt_worker import AdaptWorker, run_forever
    from stream.kafka.services import build_services
    from stream.kafka.topics import ensure_topics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    services = build_services(settings)
    ensure_topics(settings.kafka, services.topics)
    services.pipeline.deployer = PausingDeployer(services.pipeline.deployer, Path(os.environ[MARKER_ENV]))
    run_forever(AdaptWorker(services))


if __name__ == "__main__":
    main()
