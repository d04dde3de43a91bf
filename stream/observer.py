"""What the pipeline tells the outside world while it works: one observer, called at every stage.

The pipeline never checks whether metrics exist: it calls its observer, which is ``NullObserver`` when nothing
listens, ``MetricsObserver`` for Prometheus (``monitoring.metrics.ServiceMetrics``), the embedded runner's recorder
for its run result, or several of them through ``Observers``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, Protocol

from monitoring.accuracy import LabelJoin
from monitoring.metrics import ServiceMetrics
from monitoring.monitor import MonitorUpdate
from terradapt.records import DeadLetter, RolloutEvent, TilePrediction

AdaptationOutcome = Literal["accepted", "rejected", "failed"]
Stage = Literal["read", "predict", "store", "observe"]


class PipelineObserver(Protocol):
    """Hooks the pipeline calls; every hook must be cheap and must not raise."""

    def stage(self, name: Stage, seconds: float) -> None:
        """A stage of one acquisition took ``seconds``."""
        ...

    def tile_done(self, region: str, seconds: float) -> None:
        """An acquisition went through every stage."""
        ...

    def dead_letter(self, letter: DeadLetter, region: str | None, seconds: float) -> None:
        """A message ended as a dead letter (``region`` when it was known and valid)."""
        ...

    def predicted(self, prediction: TilePrediction, confidence: float) -> None:
        """A tile was predicted."""
        ...

    def monitored(self, prediction: TilePrediction, update: MonitorUpdate) -> None:
        """A tile updated its region's monitor."""
        ...

    def adapted(self, region: str, method: str, outcome: AdaptationOutcome, seconds: float) -> None:
        """An adaptation job ended."""
        ...

    def rolled_out(self, event: RolloutEvent) -> None:
        """A deployer decided on a version."""
        ...

    def labelled(self, region: str, join: LabelJoin) -> None:
        """A delayed label was joined (or not) with its prediction."""
        ...


class NullObserver:
    """Listens to nothing."""

    def stage(self, name: Stage, seconds: float) -> None:
        pass

    def tile_done(self, region: str, seconds: float) -> None:
        pass

    def dead_letter(self, letter: DeadLetter, region: str | None, seconds: float) -> None:
        pass

    def predicted(self, prediction: TilePrediction, confidence: float) -> None:
        pass

    def monitored(self, prediction: TilePrediction, update: MonitorUpdate) -> None:
        pass

    def adapted(self, region: str, method: str, outcome: AdaptationOutcome, seconds: float) -> None:
        pass

    def rolled_out(self, event: RolloutEvent) -> None:
        pass

    def labelled(self, region: str, join: LabelJoin) -> None:
        pass


class MetricsObserver(NullObserver):
    """Every pipeline event as Prometheus metrics (``ServiceMetrics``)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def stage(self, name: Stage, seconds: float) -> None:
        self.metrics.observe_stage(name, seconds)

    def tile_done(self, region: str, seconds: float) -> None:
        self.metrics.observe_tile(region, seconds, "ok")

    def dead_letter(self, letter: DeadLetter, region: str | None, seconds: float) -> None:
        self.metrics.observe_dead_letter(letter.reason)
        if region is not None:
            self.metrics.observe_tile(region, seconds, "dead_letter")

    def predicted(self, prediction: TilePrediction, confidence: float) -> None:
        self.metrics.observe_prediction(prediction.region, prediction.model_version, confidence)

    def monitored(self, prediction: TilePrediction, update: MonitorUpdate) -> None:
        self.metrics.observe_drift(
            prediction.region,
            update.scores,
            update.thresholds,
            update.fired,
            newly_detected=update.newly_detected,
            acquired=prediction.acquired,
        )

    def adapted(self, region: str, method: str, outcome: AdaptationOutcome, seconds: float) -> None:
        self.metrics.observe_adaptation(region, method, outcome, seconds)

    def rolled_out(self, event: RolloutEvent) -> None:
        self.metrics.observe_rollout(event)

    def labelled(self, region: str, join: LabelJoin) -> None:
        self.metrics.observe_label(region, join.outcome)
        if join.window is not None:
            w = join.window
            self.metrics.observe_accuracy(w.region, w.version, w.accuracy, w.miou, w.tiles)


class Observers(NullObserver):
    """Several observers, called in order."""

    def __init__(self, *observers: PipelineObserver) -> None:
        self.observers = observers

    def stage(self, name: Stage, seconds: float) -> None:
        for o in self.observers:
            o.stage(name, seconds)

    def tile_done(self, region: str, seconds: float) -> None:
        for o in self.observers:
            o.tile_done(region, seconds)

    def dead_letter(self, letter: DeadLetter, region: str | None, seconds: float) -> None:
        for o in self.observers:
            o.dead_letter(letter, region, seconds)

    def predicted(self, prediction: TilePrediction, confidence: float) -> None:
        for o in self.observers:
            o.predicted(prediction, confidence)

    def monitored(self, prediction: TilePrediction, update: MonitorUpdate) -> None:
        for o in self.observers:
            o.monitored(prediction, update)

    def adapted(self, region: str, method: str, outcome: AdaptationOutcome, seconds: float) -> None:
        for o in self.observers:
            o.adapted(region, method, outcome, seconds)

    def rolled_out(self, event: RolloutEvent) -> None:
        for o in self.observers:
            o.rolled_out(event)

    def labelled(self, region: str, join: LabelJoin) -> None:
        for o in self.observers:
            o.labelled(region, join)


@contextmanager
def timed(observer: PipelineObserver, name: Stage) -> Iterator[None]:
    """Report the duration of the enclosed block as stage ``name``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        observer.stage(name, time.perf_counter() - t0)
