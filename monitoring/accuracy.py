"""Delayed-label accuracy: join reference masks that arrive later with the predictions made when the tile came in.

Labels for a region arrive days or weeks after its acquisitions, by which time the region may serve another model
version. The accuracy that matters is the one of the version that *made* each prediction, so a prediction is
recorded with its version when it is made, and the label is joined to it by acquisition id when it arrives. Each
(region, version) keeps a rolling window of per-tile confusion matrices: the window follows the recent data (a
cumulative matrix would hide a drop behind months of good tiles) and its sum is kept incrementally.

Memory is bounded everywhere: pending predictions (``max_pending``, oldest evicted first), class maps kept in
memory (``max_stored_maps``; beyond it the map is fetched from storage again through ``fetch``), tiles per
window (``window``) and versions per region (``max_versions_per_region``, least recently labelled evicted).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from terradapt.classes import IGNORE_INDEX
from terradapt.metrics import confusion_matrix, miou
from terradapt.records import TilePrediction

ClassMap = npt.NDArray[np.integer[Any]]
Confusion = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PendingPrediction:
    """A prediction waiting for its label: who made it, and where its class map is stored."""

    acquisition_id: str
    region: str
    version: int
    href: str | None = None


#: Loads the class map of a pending prediction (e.g. reads the prediction COG at ``href`` from the blob store).
FetchClassMap = Callable[[PendingPrediction], ClassMap]


@dataclass(frozen=True)
class WindowAccuracy:
    """Accuracy of one model version on one region's most recent labelled tiles."""

    region: str
    version: int
    accuracy: float
    miou: float
    tiles: int
    pixels: int


@dataclass(frozen=True)
class LabelJoin:
    """What happened to one delayed label.

    Attributes:
        outcome: ``joined`` (scored), ``unmatched`` (no pending prediction: never seen, already labelled or
            evicted) or ``invalid`` (the mask does not fit the prediction; the prediction stays pending so a
            corrected label can still be joined).
        acquisition_id: The label's acquisition.
        region: Region of the prediction, when one was found.
        version: Model version that made the prediction, when one was found.
        tile_accuracy: Pixel accuracy of this tile alone (``joined`` only).
        window: The (region, version) window after adding this tile (``joined`` only).
        confusion: This tile's confusion matrix (truth rows; ``joined`` only).
        detail: Why a label was not joined.

    """

    outcome: Literal["joined", "unmatched", "invalid"]
    acquisition_id: str
    region: str | None = None
    version: int | None = None
    tile_accuracy: float | None = None
    window: WindowAccuracy | None = None
    confusion: Confusion | None = None
    detail: str = ""


class _Window:
    """Last ``size`` per-tile confusion matrices and their running sum."""

    def __init__(self, num_classes: int, size: int) -> None:
        self.tiles: deque[Confusion] = deque(maxlen=size)
        self.total: Confusion = np.zeros((num_classes, num_classes), np.int64)

    def add(self, cm: Confusion) -> None:
        if len(self.tiles) == self.tiles.maxlen:
            self.total -= self.tiles[0]
        self.tiles.append(cm)
        self.total += cm


class DelayedLabelTracker:
    """Per (region, model version) rolling-window accuracy and mIoU from labels that arrive late.

    Args:
        num_classes: Number of classes of the class maps (confusion matrices are ``num_classes`` square).
        window: Labelled tiles per (region, version) window.
        fetch: Loads a class map that is not kept in memory (``None``: every prediction must come with its map).
        ignore_index: Label value of unlabelled pixels (not scored).
        max_pending: Predictions waiting for a label; the oldest are forgotten first.
        max_stored_maps: Class maps kept in memory; older ones are dropped (and fetched again when their label
            arrives, or the prediction is forgotten when there is no ``fetch``).
        max_versions_per_region: Windows kept per region; the least recently labelled version is dropped.

    """

    def __init__(
        self,
        num_classes: int,
        window: int = 50,
        *,
        fetch: FetchClassMap | None = None,
        ignore_index: int = IGNORE_INDEX,
        max_pending: int = 4096,
        max_stored_maps: int = 64,
        max_versions_per_region: int = 4,
    ) -> None:
        for name, value, low in (
            ("num_classes", num_classes, 2),
            ("window", window, 1),
            ("max_pending", max_pending, 1),
            ("max_stored_maps", max_stored_maps, 0),
            ("max_versions_per_region", max_versions_per_region, 1),
        ):
            if value < low:
                raise ValueError(f"{name}={value}; accepted: an integer >= {low}")
        self.num_classes = num_classes
        self.window_size = window
        self.fetch = fetch
        self.ignore_index = ignore_index
        self.max_pending = max_pending
        self.max_stored_maps = max_stored_maps
        self.max_versions_per_region = max_versions_per_region
        self._pending: OrderedDict[str, PendingPrediction] = OrderedDict()
        self._maps: OrderedDict[str, ClassMap] = OrderedDict()
        self._windows: dict[str, OrderedDict[int, _Window]] = {}
        self.evicted = 0

    # -- predictions -----------------------------------------------------------------------------------------
    def record_prediction(
        self,
        acquisition_id: str,
        region: str,
        version: int,
        *,
        class_map: ClassMap | None = None,
        href: str | None = None,
    ) -> None:
        """Remember a prediction until its label arrives.

        Args:
            acquisition_id: The join key (labels name the acquisition they belong to).
            region: Region of the acquisition.
            version: Model version that made the prediction.
            class_map: The predicted class map, kept in memory while there is room.
            href: Where the prediction is stored (handed to ``fetch`` when the map is not in memory).

        Raises:
            ValueError: Neither a class map nor a ``fetch`` to load it later.

        """
        if class_map is None and self.fetch is None:
            raise ValueError(
                f"prediction {acquisition_id!r} has no class_map and the tracker has no fetch; accepted: pass "
                "class_map, or build the tracker with fetch= to load stored predictions"
            )
        self._pending.pop(acquisition_id, None)
        self._pending[acquisition_id] = PendingPrediction(acquisition_id, region, int(version), href)
        if class_map is not None and self.max_stored_maps > 0:
            self._maps.pop(acquisition_id, None)
            self._maps[acquisition_id] = np.asarray(class_map)
        elif class_map is not None and self.fetch is None:
            self._forget(acquisition_id)  # nowhere to keep it, nowhere to fetch it from
            self.evicted += 1
        while len(self._maps) > self.max_stored_maps:
            oldest, _ = self._maps.popitem(last=False)
            if self.fetch is None:
                self._pending.pop(oldest, None)
                self.evicted += 1
        while len(self._pending) > self.max_pending:
            oldest, _ = self._pending.popitem(last=False)
            self._maps.pop(oldest, None)
            self.evicted += 1

    def record(self, prediction: TilePrediction, class_map: ClassMap | None = None) -> None:
        """Remember a ``TilePrediction`` record (its ``href`` is what ``fetch`` will load)."""
        self.record_prediction(
            prediction.acquisition_id,
            prediction.region,
            prediction.model_version,
            class_map=class_map,
            href=prediction.href,
        )

    def _forget(self, acquisition_id: str) -> None:
        self._pending.pop(acquisition_id, None)
        self._maps.pop(acquisition_id, None)

    @property
    def pending(self) -> int:
        """Predictions waiting for their label."""
        return len(self._pending)

    @property
    def stored_maps(self) -> int:
        """Class maps held in memory."""
        return len(self._maps)

    # -- labels ----------------------------------------------------------------------------------------------
    def add_label(self, acquisition_id: str, mask: npt.NDArray[np.integer[Any]]) -> LabelJoin:
        """Join a reference mask with its prediction and update that version's window.

        Args:
            acquisition_id: The acquisition the mask belongs to.
            mask: Reference class indices (``ignore_index`` for unlabelled pixels), same shape as the prediction.

        Returns:
            What happened; ``window`` holds the updated accuracy when the label was joined.

        Raises:
            TerradaptError: Whatever ``fetch`` raises (e.g. ObjectNotFoundError); the prediction stays pending.

        """
        pending = self._pending.get(acquisition_id)
        if pending is None:
            return LabelJoin("unmatched", acquisition_id, detail="no pending prediction with this acquisition id")
        class_map = self._maps.get(acquisition_id)
        if class_map is None:
            if self.fetch is None:  # restored from a state without maps, and nothing to load them with
                self._forget(acquisition_id)
                return LabelJoin("unmatched", acquisition_id, detail="class map evicted")
            class_map = self.fetch(pending)
        truth = np.asarray(mask)
        if truth.shape != np.shape(class_map):
            return LabelJoin(
                "invalid",
                acquisition_id,
                pending.region,
                pending.version,
                detail=f"label shape {truth.shape} != prediction shape {np.shape(class_map)}",
            )
        cm = confusion_matrix(class_map, truth, self.num_classes, self.ignore_index)
        self._forget(acquisition_id)
        window = self._window(pending.region, pending.version)
        window.add(cm)
        pixels = int(cm.sum())
        tile_acc = float(np.trace(cm) / pixels) if pixels else None
        return LabelJoin(
            "joined",
            acquisition_id,
            pending.region,
            pending.version,
            tile_acc,
            self._summary(pending.region, pending.version, window),
            cm,
        )

    def _window(self, region: str, version: int) -> _Window:
        versions = self._windows.setdefault(region, OrderedDict())
        window = versions.get(version)
        if window is None:
            window = versions[version] = _Window(self.num_classes, self.window_size)
        versions.move_to_end(version)
        while len(versions) > self.max_versions_per_region:
            versions.popitem(last=False)
        return window

    @staticmethod
    def _summary(region: str, version: int, window: _Window) -> WindowAccuracy:
        pixels = int(window.total.sum())
        accuracy = float(np.trace(window.total) / pixels) if pixels else 0.0
        return WindowAccuracy(region, version, accuracy, miou(window.total), len(window.tiles), pixels)

    # -- reading ---------------------------------------------------------------------------------------------
    def window(self, region: str, version: int) -> WindowAccuracy | None:
        """The current window of ``version`` on ``region`` (None before its first label)."""
        w = self._windows[region].get(version) if region in self._windows else None
        return None if w is None else self._summary(region, version, w)

    def windows(self) -> list[WindowAccuracy]:
        """Every window, by region then version."""
        return [
            self._summary(region, version, w)
            for region in sorted(self._windows)
            for version, w in sorted(self._windows[region].items())
        ]

    # -- persistence -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: windows and pending predictions (class maps are not kept: use ``fetch``)."""
        return {
            "num_classes": self.num_classes,
            "window": self.window_size,
            "windows": [
                {"region": region, "version": version, "tiles": [cm.ravel().tolist() for cm in w.tiles]}
                for region, versions in self._windows.items()
                for version, w in versions.items()
            ],
            "pending": [
                {"acquisition_id": p.acquisition_id, "region": p.region, "version": p.version, "href": p.href}
                for p in self._pending.values()
                if self.fetch is not None or p.acquisition_id not in self._maps
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output (the number of classes must match)."""
        k = int(state["num_classes"])
        if k != self.num_classes:
            raise ValueError(f"state num_classes={k}; accepted: {self.num_classes} (this tracker's)")
        self._windows.clear()
        self._pending.clear()
        self._maps.clear()
        for entry in state["windows"]:
            w = self._window(str(entry["region"]), int(entry["version"]))
            for flat in entry["tiles"]:
                w.add(np.asarray(flat, np.int64).reshape(k, k))
        for p in state["pending"]:
            self._pending[str(p["acquisition_id"])] = PendingPrediction(
                str(p["acquisition_id"]), str(p["region"]), int(p["version"]), p.get("href")
            )
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
