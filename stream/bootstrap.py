"""Bootstrap a registry: publish the source model and its calibration data (``terradapt registry-init``, demo, bench).

Calibration runs the source model on *held-out* source tiles and keeps what it saw (``monitoring.calibration``):
their features, their ids, and with labels the source confusion matrix that label-shift estimates need. The
registry refuses a calibration that overlaps the source model's training tiles. With labels and the adaptation
methods to calibrate (``selection_methods``), the calibration also holds the label-free selection's domains
(``adapters.selection_calibration``): each method adapted on shifted calibration tiles, with its true mIoU change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from adapters.selection import SelectionConfig
from adapters.selection_calibration import calibrate_selection
from monitoring.calibration import CalibrationData
from serving.predictor import InProcessPredictor, Predictor
from serving.registry import SOURCE, ModelRegistry
from terradapt.checkpoint import ModelManifest
from terradapt.classes import IGNORE_INDEX
from terradapt.metrics import confusion_matrix
from terradapt.records import ModelVersion
from terradapt.training import class_band_means


def calibrate(
    predictor: Predictor,
    images: Sequence[npt.NDArray[np.uint8]],
    *,
    tile_ids: Sequence[str] = (),
    masks: Sequence[npt.NDArray[np.uint8]] | None = None,
    seed: int = 0,
    model_sha256: str = "",
) -> CalibrationData:
    """The calibration data of held-out source tiles, predicted by the source model (version 0).

    With ``masks`` (labels of the same tiles), it also holds the source model's pixel confusion matrix
    ``[pred, true]``: what BBSE needs to estimate a region's class mix.
    """
    outs = predictor.predict(SOURCE, list(images), version=0)
    confusion = None
    if masks is not None:
        if len(masks) != len(outs):
            raise ValueError(f"{len(masks)} masks for {len(outs)} calibration tiles")
        k = outs[0].features.class_shares.shape[0]
        cm = sum(confusion_matrix(o.class_map, m, k, IGNORE_INDEX) for o, m in zip(outs, masks, strict=True))
        confusion = np.asarray(cm).T  # truth rows -> [pred, true]
    return CalibrationData.from_features(
        [o.features for o in outs], tile_ids=tile_ids, seed=seed, model_sha256=model_sha256, confusion=confusion
    )


def bootstrap_registry(
    registry: ModelRegistry,
    weights: bytes,
    manifest: ModelManifest,
    images: Sequence[npt.NDArray[np.uint8]],
    *,
    tile_ids: Sequence[str] = (),
    masks: Sequence[npt.NDArray[np.uint8]] | None = None,
    seed: int = 0,
    device: str = "auto",
    selection_methods: Sequence[str] = (),
    selection: SelectionConfig | None = None,
) -> tuple[ModelVersion, CalibrationData]:
    """Publish the source model, calibrate it on held-out source ``images``, publish the calibration.

    ``selection_methods`` (with ``masks``): the adaptation methods whose label-free selection is calibrated on
    these tiles (areas = the region part of ``tile_ids``, ``<region>/<tile>``); none, or ``selection.enabled``
    false: no selection domains are computed, and the gate's heuristics decide.

    An imported model (``terradapt import-model``) has no per-class source look nor class prior in its manifest;
    with ``masks`` they are measured here on the labelled calibration tiles and stored in the published manifest
    (data beside the weights: the weights and their sha256 do not change).

    Raises:
        ValueError: A calibration tile is one the source model trained on (its manifest lists them).

    """
    if masks is not None and (not manifest.class_band_mean or not manifest.class_prior):
        means, prior = class_band_means(images, masks, len(manifest.classes))
        manifest = manifest.model_copy(
            update={
                "class_band_mean": manifest.class_band_mean or tuple(tuple(float(v) for v in r) for r in means),
                "class_prior": manifest.class_prior or tuple(float(v) for v in prior),
            }
        )
    version = registry.publish_source(weights, manifest)
    data = calibrate(
        InProcessPredictor(registry, device=device),
        images,
        tile_ids=tile_ids,
        masks=masks,
        seed=seed,
        model_sha256=version.sha256,
    )
    cfg = selection or SelectionConfig()
    if masks is not None and selection_methods and cfg.enabled:
        source, manifest = registry.load(SOURCE, 0)
        domains = calibrate_selection(
            source,
            manifest,
            images,
            masks,
            [t.split("/", 1)[0] for t in tile_ids] if tile_ids else ["source"] * len(images),
            methods=tuple(dict.fromkeys(selection_methods)),
            tiles_per_domain=cfg.calibration_tiles_per_domain,
            seed=seed,
            device="cpu" if device == "auto" else device,
        )
        data = data.model_copy(update={"selection": tuple(d.model_dump() for d in domains)})
    registry.publish_calibration(data)
    return version, data
