"""Every Prometheus metric terradapt exports, defined once on an injected registry.

``ServiceMetrics(registry)`` owns the metric objects; runners call its small typed methods at each stage of the
pipeline and never touch ``prometheus_client`` themselves. Nothing is created at import time: a module-level
metric breaks re-imports and tests ("Duplicated timeseries"), and the embedded runner, every Kafka worker and every
test each want their own registry.

Cardinality is bounded on purpose. Labels only take region codes and small enums, never tile ids or dates:

* a region label is checked against the region pattern (and the configured region set, when one is given); any
  other value is reported as ``other``, so a flood of malformed acquisitions cannot create series;
* dead-letter reasons come from :data:`DEAD_LETTER_REASONS`, unknown reasons become ``other``;
* version-labelled series are pruned: ``terradapt_model_info`` keeps only the current version of a region, and the
  accuracy gauges keep the ``max_versions_per_region`` most recently observed versions.

Counters with labels are created at zero for every value of their enum the first time a region (or method) is
seen, so ``rate()``/``increase()`` see the first event instead of a series that is born at 1.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from terradapt.records import REGION_PATTERN, RolloutEvent, RolloutStep

PREFIX: Final = "terradapt"

#: Label used for any region, reason or signal outside the accepted set (keeps cardinality bounded).
OTHER: Final = "other"

TileOutcome = Literal["ok", "dead_letter"]
TILE_OUTCOMES: Final[tuple[TileOutcome, ...]] = ("ok", "dead_letter")

AdaptationOutcome = Literal["accepted", "rejected", "failed"]
ADAPTATION_OUTCOMES: Final[tuple[AdaptationOutcome, ...]] = ("accepted", "rejected", "failed")

LabelOutcome = Literal["joined", "unmatched", "invalid"]
LABEL_OUTCOMES: Final[tuple[LabelOutcome, ...]] = ("joined", "unmatched", "invalid")

#: Stages timed by ``terradapt_tile_latency_seconds``; ``total`` is one acquisition end to end.
STAGES: Final = ("read", "predict", "store", "features", "observe", "total")

#: Every ``TerradaptError.reason`` (tests check this list against terradapt.errors) plus a catch-all.
DEAD_LETTER_REASONS: Final = (
    "invalid_tile",
    "corrupt_tile",
    "oversized_tile",
    "malformed_payload",
    "unknown_region",
    "missing_object",
    "forbidden_href",
    "missing_model_version",
    "checksum_mismatch",
    "unknown_name",
    "error",
    # serving errors (serving.torchserve, serving.codec, serving.packaging)
    "storage_unavailable",
    "torchserve_error",
    "torchserve_unavailable",
    "torchserve_auth",
    "torchserve_conflict",
    "packaging_failed",
    # adaptation errors (adapters.common: a source-replay method started without source tiles, a BatchNorm method
    # on a model without BatchNorm)
    "missing_source_tiles",
    "method_not_applicable",
    # models (terradapt.architectures, terradapt.importing: a manifest naming an architecture that cannot be built,
    # a user checkpoint that does not match or needs code to unpickle)
    "bad_architecture",
    "checkpoint_mismatch",
    "unsafe_checkpoint",
    # few-shot adaptation (adapters.fewshot: a few-shot job with fewer labelled tiles than it needs)
    "too_few_labels",
    # pipeline errors (stream.pipeline, monitoring.calibration)
    "key_mismatch",
    "predictor_unavailable",
    "invalid_calibration",
    # parcel time series (terradapt.crops.series: InvalidSeriesError and the reasons it names)
    "invalid_series",
    "dates_not_increasing",
    "wrong_band_count",
    "nan_share",
    # ingest (terradapt.capture_time: a tile nothing dates, when the ingest requires a capture time)
    "unknown_capture_time",
    # runner-level reasons (not TerradaptError subclasses)
    "internal_error",
    "adaptation_failed",
    "no_tiles",
    "insufficient_parcels",  # a crop adaptation job with too few readable series (stream.crops.steps)
    OTHER,
)

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

#: Per-tile latency: a 512 px tile on CPU takes tens of milliseconds to seconds; a slow object read, more.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Adaptation runs take seconds (BatchNorm re-estimation) to minutes (entropy minimisation over many steps).
ADAPTATION_BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class MetricsServer:
    """A running ``/metrics`` HTTP server; ``stop()`` shuts it down and joins its thread."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The scrape URL."""
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; idempotent."""
        shutdown = getattr(self._server, "shutdown", None)
        close = getattr(self._server, "server_close", None)
        if shutdown is not None:
            shutdown()
        if close is not None:
            close()
        self._thread.join(timeout)


def serve(registry: CollectorRegistry, port: int = 0, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    Nothing listens until this is called: importing the module or building :class:`ServiceMetrics` opens no port,
    so tests and one-shot commands can record metrics without serving them. ``port=0`` picks a free port, read
    back from the returned handle.

    Args:
        registry: The registry to expose (the one given to :class:`ServiceMetrics`).
        port: TCP port; 0 for any free port.
        addr: Bind address; loopback by default so nothing is exposed beyond the machine.

    Returns:
        The server handle with the bound port and ``stop()``.

    """
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(addr, int(server.server_port), server, thread)


class ServiceMetrics:
    """All terradapt metrics on one registry, with one typed method per thing the pipeline observes.

    Args:
        registry: Where the metrics are registered (a fresh ``CollectorRegistry`` per process or test).
        regions: The regions this process serves; any other region label is reported as ``other``. ``None``
            accepts every well-formed region code.
        confidence_window: Tiles in the rolling mean of the label-free confidence estimate.
        max_versions_per_region: Versions whose accuracy series are kept per region (older ones are removed).

    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        regions: Iterable[str] | None = None,
        confidence_window: int = 50,
        max_versions_per_region: int = 4,
    ) -> None:
        if confidence_window < 1:
            raise ValueError(f"confidence_window={confidence_window}; accepted: an integer >= 1")
        if max_versions_per_region < 1:
            raise ValueError(f"max_versions_per_region={max_versions_per_region}; accepted: an integer >= 1")
        self.registry = registry
        self.regions = frozenset(regions) if regions is not None else None
        self.confidence_window = confidence_window
        self.max_versions_per_region = max_versions_per_region
        self._lock = threading.Lock()
        self._known_regions: set[str] = set()
        self._known_methods: set[tuple[str, str]] = set()
        self._current: dict[str, str] = {}
        self._previous: dict[str, str] = {}
        self._confidence: dict[str, deque[float]] = {}
        self._accuracy_versions: dict[str, OrderedDict[str, None]] = {}

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry)

        # -- stream ------------------------------------------------------------------------------------------
        self.tiles = counter(
            "tiles_processed", "Acquisitions handled, by region and outcome (ok or dead_letter).", ("region", "outcome")
        )
        self.dead_letters = counter(
            "dead_letters", "Payloads sent to the dead-letter topic, by reason (bounded set).", ("reason",)
        )
        self.latency = Histogram(
            f"{PREFIX}_tile_latency_seconds",
            "Time spent on one acquisition, by pipeline stage (total = end to end).",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.confidence = gauge(
            "mean_confidence_ratio",
            "Label-free performance estimate: rolling mean over recent tiles of the mean max-softmax "
            "confidence (average-confidence estimate of pixel accuracy; optimistic under shift).",
            ("region",),
        )
        # -- drift -------------------------------------------------------------------------------------------
        self.drift_score = gauge("drift_score", "Current drift statistic of a region's signal.", ("region", "signal"))
        self.tile_acquired = gauge(
            "tile_acquired_timestamp_seconds",
            "Capture time of the region's last monitored tile (Unix seconds; drift against acquisition time).",
            ("region",),
        )
        self.drift_threshold = gauge(
            "drift_threshold", "Calibrated alarm threshold of a region's signal.", ("region", "signal")
        )
        self.drift_detected = gauge(
            "drift_detected", "1 while a region's signal is in the drift state, else 0.", ("region", "signal")
        )
        self.drift_events = counter(
            "drift_events", "Times a region crossed into drift, by the signal that fired.", ("region", "signal")
        )
        # -- models, adaptation, rollout ----------------------------------------------------------------------
        self.model_info = gauge(
            "model_info",
            "1 for the model version a region currently serves (only that version is kept).",
            ("region", "version"),
        )
        self.previous_info = gauge(
            "model_previous_info",
            "1 for the version a region served before the current one (its rollback "
            "target); compared with the current one after a rollout.",
            ("region", "version"),
        )
        self.current_version = gauge(
            "model_current_version", "Model version a region currently serves (0 = source model).", ("region",)
        )
        self.adaptations = counter(
            "adaptation_runs",
            "Adaptation jobs by region, method and outcome (accepted, rejected by the gate, failed with an error).",
            ("region", "method", "outcome"),
        )
        self.adaptation_duration = Histogram(
            f"{PREFIX}_adaptation_duration_seconds",
            "Wall time of one adaptation job (adapt + gate + publish), by method.",
            ("method",),
            buckets=ADAPTATION_BUCKETS,
            registry=registry,
        )
        self.rollouts = counter("rollout_events", "Rollout steps by region and step.", ("region", "step"))
        # -- delayed labels ----------------------------------------------------------------------------------
        self.labelled = counter(
            "labelled_tiles", "Delayed reference masks received, by region and join outcome.", ("region", "outcome")
        )
        self.accuracy = gauge(
            "labelled_accuracy_ratio",
            "Pixel accuracy on the rolling window of delayed labels, by model version.",
            ("region", "version"),
        )
        self.miou = gauge(
            "labelled_miou_ratio",
            "Mean IoU on the rolling window of delayed labels, by model version.",
            ("region", "version"),
        )
        self.window_tiles = gauge(
            "labelled_window_tiles",
            "Labelled tiles in the accuracy window of a region and model version.",
            ("region", "version"),
        )
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)

    # -- label hygiene ---------------------------------------------------------------------------------------
    def region_label(self, region: str) -> str:
        """The label value for ``region``: itself when well-formed (and served), else ``other``."""
        if not REGION_PATTERN.match(region):
            return OTHER
        if self.regions is not None and region not in self.regions:
            return OTHER
        return region

    @staticmethod
    def _name_label(signal: str) -> str:
        return signal if _NAME_PATTERN.match(signal) else OTHER

    @staticmethod
    def _check(value: str, accepted: tuple[str, ...], what: str) -> str:
        if value not in accepted:
            raise ValueError(f"{what}={value!r}; accepted: {', '.join(accepted)}")
        return value

    def init_region(self, region: str) -> str:
        """Create a region's counters at zero (first sight of a region); return its label value.

        Idempotent and cheap; every ``observe_*`` method calls it, so the pipeline never has to.
        """
        label = self.region_label(region)
        if label in self._known_regions:
            return label
        with self._lock:
            if label not in self._known_regions:
                for outcome in TILE_OUTCOMES:
                    self.tiles.labels(label, outcome)
                for step in RolloutStep:
                    self.rollouts.labels(label, step.value)
                for lo in LABEL_OUTCOMES:
                    self.labelled.labels(label, lo)
                self._known_regions.add(label)
        return label

    # -- stream ----------------------------------------------------------------------------------------------
    def observe_tile(self, region: str, latency_s: float, outcome: TileOutcome = "ok") -> None:
        """Count one acquisition of ``region`` and its end-to-end latency (call once per acquisition, last)."""
        label = self.init_region(region)
        self.tiles.labels(label, self._check(outcome, TILE_OUTCOMES, "outcome")).inc()
        self.latency.labels("total").observe(max(0.0, latency_s))

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Time of one pipeline stage for one acquisition (stages: read, predict, store, features, observe)."""
        self.latency.labels(self._check(stage, STAGES, "stage")).observe(max(0.0, seconds))

    def observe_dead_letter(self, reason: str) -> None:
        """Count one dead letter; ``reason`` is a ``TerradaptError.reason`` (others are reported as ``other``)."""
        self.dead_letters.labels(reason if reason in DEAD_LETTER_REASONS else OTHER).inc()

    def observe_prediction(self, region: str, version: int, mean_confidence: float) -> None:
        """A tile was predicted by ``version``: refresh the served version and the label-free estimate.

        The rolling mean of the per-tile mean confidence is the cheapest label-free accuracy estimate; it is
        reported next to the delayed-label accuracy so their gap (over-confidence under shift) is visible.
        """
        label = self.init_region(region)
        self.set_current_version(region, version)
        with self._lock:
            window = self._confidence.setdefault(label, deque(maxlen=self.confidence_window))
            window.append(float(mean_confidence))
            mean = sum(window) / len(window)
        self.confidence.labels(label).set(mean)

    # -- drift -----------------------------------------------------------------------------------------------
    def observe_drift(
        self,
        region: str,
        scores: Mapping[str, float],
        thresholds: Mapping[str, float],
        fired: Iterable[str] = (),
        *,
        newly_detected: bool = False,
        acquired: datetime | None = None,
    ) -> None:
        """Publish a region's monitor update (``MonitorUpdate`` fields) after each tile.

        Args:
            region: Region code.
            scores: Current statistic per signal.
            thresholds: Calibrated threshold per signal.
            fired: Signals in the drift state.
            newly_detected: The region has just crossed into drift (counts one drift event per fired signal).
            acquired: The tile's capture time, when known (``tile_acquired_timestamp_seconds``).

        """
        label = self.init_region(region)
        if acquired is not None:
            self.tile_acquired.labels(label).set(acquired.timestamp())
        fired_set = {self._name_label(s) for s in fired}
        for signal, score in scores.items():
            s = self._name_label(signal)
            self.drift_score.labels(label, s).set(float(score))
            if signal in thresholds:
                self.drift_threshold.labels(label, s).set(float(thresholds[signal]))
            self.drift_detected.labels(label, s).set(1.0 if s in fired_set else 0.0)
            self.drift_events.labels(label, s)
        if newly_detected:
            for s in fired_set:
                self.drift_events.labels(label, s).inc()

    # -- models ----------------------------------------------------------------------------------------------
    def set_current_version(self, region: str, version: int, previous: int | None = None) -> None:
        """Make ``version`` the region's served version.

        Only the current version keeps a ``terradapt_model_info`` series, and only the version served before it
        keeps a ``terradapt_model_previous_info`` series, so both stay one series per region.

        Args:
            region: Region code.
            version: The version now served.
            previous: The version served before (default: the current one known to this process, if any).

        """
        label = self.init_region(region)
        value = str(int(version))
        with self._lock:
            old = self._current.get(label)
            prev = str(int(previous)) if previous is not None else (old if old != value else None)
            if old != value:
                if old is not None:
                    self.model_info.remove(label, old)
                self._current[label] = value
                self.model_info.labels(label, value).set(1.0)
                self.current_version.labels(label).set(float(version))
            old_prev = self._previous.get(label)
            if prev is not None and prev != old_prev:
                if old_prev is not None:
                    self.previous_info.remove(label, old_prev)
                self._previous[label] = prev
                self.previous_info.labels(label, prev).set(1.0)

    def observe_adaptation(self, region: str, method: str, outcome: AdaptationOutcome, duration_s: float) -> None:
        """One adaptation job finished: accepted or rejected by the gate, or failed with an error."""
        label = self.init_region(region)
        method_label = self._name_label(method)
        key = (label, method_label)
        if key not in self._known_methods:
            with self._lock:
                for o in ADAPTATION_OUTCOMES:
                    self.adaptations.labels(label, method_label, o)
                self._known_methods.add(key)
        self.adaptations.labels(label, method_label, self._check(outcome, ADAPTATION_OUTCOMES, "outcome")).inc()
        self.adaptation_duration.labels(method_label).observe(max(0.0, duration_s))

    def observe_rollout(self, event: RolloutEvent) -> None:
        """Count a rollout step; a promotion or a rollback also changes the served version."""
        label = self.init_region(event.region)
        self.rollouts.labels(label, RolloutStep(event.step).value).inc()
        if event.step in (RolloutStep.PROMOTED, RolloutStep.ROLLED_BACK):
            self.set_current_version(event.region, event.version, event.previous)

    # -- delayed labels --------------------------------------------------------------------------------------
    def observe_label(self, region: str, outcome: LabelOutcome) -> None:
        """Count one delayed reference mask: joined with its prediction, unmatched, or invalid."""
        label = self.init_region(region)
        self.labelled.labels(label, self._check(outcome, LABEL_OUTCOMES, "outcome")).inc()

    def observe_accuracy(self, region: str, version: int, accuracy: float, miou: float, tiles: int = 0) -> None:
        """Publish the rolling-window accuracy and mIoU of ``version`` on ``region``'s delayed labels.

        Only the ``max_versions_per_region`` most recently observed versions keep their series: an old version
        that no longer predicts anything would otherwise keep a stale value forever.
        """
        label = self.init_region(region)
        value = str(int(version))
        evicted: list[str] = []
        with self._lock:
            versions = self._accuracy_versions.setdefault(label, OrderedDict())
            versions[value] = None
            versions.move_to_end(value)
            while len(versions) > self.max_versions_per_region:
                old, _ = versions.popitem(last=False)
                evicted.append(old)
        for old in evicted:
            for g in (self.accuracy, self.miou, self.window_tiles):
                g.remove(label, old)
        self.accuracy.labels(label, value).set(float(accuracy))
        self.miou.labels(label, value).set(float(miou))
        self.window_tiles.labels(label, value).set(float(tiles))

    # -- exposition ------------------------------------------------------------------------------------------
    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve this registry on ``http://addr:port/metrics`` (see :func:`serve`)."""
        return serve(self.registry, port, addr)
