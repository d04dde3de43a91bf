"""Calibration *data*: what the source model saw on held-out source tiles, stored beside it, never configuration.

A monitor's thresholds depend on the runtime config (detector, window, ERT) *and* on the source features. Storing
finished thresholds would freeze the config of the day the calibration ran (a later ``TERRADAPT_MONITOR__ERT``
would be ignored), so the calibration stores the inputs instead:

* the features of every calibration tile as the source model computed them, in tile order;
* the tile ids (so a registry can refuse calibration tiles the model trained on) and the source weights' sha256
  (a calibration made with another model is refused at start);
* the seed of the cross-fitting split: the tiles are *shuffled* with it before being cut in two halves (halves
  cut in input order put whole areas on one side and inflated thresholds ~4x, shared/FINDINGS.md);
* the source model's pixel confusion matrix on the labelled calibration tiles, ``[pred, true]``, for BBSE;
* with labels, the label-free selection's calibration domains (``adapters.selection_calibration``): features
  and true mIoU change of adapted candidates on shifted calibration tiles, from which each process fits its
  estimator with its own settings.

Every process calibrates its monitors from this data with its own config at start (milliseconds to a second).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from monitoring.features import TileFeatures
from terradapt.errors import TerradaptError

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = 2
#: Below this many calibration tiles the cross-fitted thresholds come out several times looser (measured on Dubai:
#: 40 tiles vs 160, shared/INFRA.md), so fewer is a warning.
RECOMMENDED_TILES = 150


class CalibrationError(TerradaptError, ValueError):
    """Calibration data that cannot calibrate the configured monitor (too few tiles, another model...)."""

    reason = "invalid_calibration"


class CalibrationData(BaseModel):
    """The stored calibration of the source model (``models/source/0/calibration.json`` in the registry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(default=CALIBRATION_FORMAT, ge=CALIBRATION_FORMAT, le=CALIBRATION_FORMAT)
    model_sha256: str = Field(default="", description="sha256 of the source weights that computed the features")
    tile_ids: tuple[str, ...] = ()
    seed: int = 0
    features: tuple[dict[str, Any], ...] = Field(min_length=2)
    confusion: tuple[tuple[float, ...], ...] | None = Field(
        default=None, description="source model pixel counts [pred, true] on the labelled calibration tiles"
    )
    selection: tuple[dict[str, Any], ...] = Field(
        default=(), description="label-free selection domains (adapters.selection.SelectionDomain rows)"
    )

    @classmethod
    def from_features(
        cls,
        features: Sequence[TileFeatures],
        *,
        tile_ids: Sequence[str] = (),
        seed: int = 0,
        model_sha256: str = "",
        confusion: np.ndarray | None = None,
        selection: Sequence[dict[str, Any]] = (),
    ) -> CalibrationData:
        """Build from the source model's features of held-out source tiles (warns below ``RECOMMENDED_TILES``)."""
        if tile_ids and len(tile_ids) != len(features):
            raise CalibrationError(f"{len(tile_ids)} tile ids for {len(features)} calibration tiles")
        if len(features) < RECOMMENDED_TILES:
            log.warning(
                "calibrating on %d tiles: thresholds come out looser below %d held-out source tiles",
                len(features),
                RECOMMENDED_TILES,
            )
        return cls(
            model_sha256=model_sha256,
            tile_ids=tuple(tile_ids),
            seed=seed,
            features=tuple(f.to_dict() for f in features),
            confusion=None if confusion is None else tuple(tuple(map(float, row)) for row in np.asarray(confusion)),
            selection=tuple(selection),
        )

    @property
    def tiles(self) -> int:
        """Number of calibration tiles."""
        return len(self.features)

    def halves(self) -> tuple[list[TileFeatures], list[TileFeatures]]:
        """The two cross-fitting halves, after a seeded shuffle of the tiles."""
        order = np.random.default_rng(self.seed).permutation(len(self.features))
        feats = [TileFeatures.from_dict(self.features[i]) for i in order]
        half = len(feats) // 2
        return feats[:half], feats[half:]

    def confusion_matrix(self) -> np.ndarray | None:
        """The ``[pred, true]`` confusion counts, or None when calibrated without labels."""
        return None if self.confusion is None else np.asarray(self.confusion, dtype=np.float64)
