"""Delayed labels kept for few-shot adaptation: the one step of ``Pipeline.process_label`` after the accuracy join."""

from __future__ import annotations

import logging

import numpy as np

from adapters.fewshot import FewShotConfig, few_shot_job
from monitoring.accuracy import LabelJoin
from serving.label_store import LabelStore
from serving.registry import ModelRegistry
from terradapt.errors import TerradaptError
from terradapt.records import AdaptationJob, LabelRecord

log = logging.getLogger("stream.pipeline")


def keep_label(
    labels: LabelStore | None,
    registry: ModelRegistry,
    config: FewShotConfig,
    label: LabelRecord,
    mask: np.ndarray,
    tags: dict[str, str],
    join: LabelJoin,
) -> AdaptationJob | None:
    """Keep a joined label for few-shot adaptation; the region's few-shot job when its label count is due.

    The image is the acquisition the prediction COG names. Failing to keep a label costs the few-shot set one
    tile, never the label's accuracy join, so it is logged rather than dead-lettered. The job carries the ids
    of the region's kept labels and no unlabelled tiles: this path does not see the region's recent
    acquisitions (they are in the acquisitions' state).
    """
    if labels is None or not config.enabled or join.outcome != "joined":
        return None
    href = tags.get("acquisition_href")
    if not href:
        log.warning("label %s: its prediction names no acquisition href; not kept", label.acquisition_id)
        return None
    try:
        count = labels.add(label.region, label.acquisition_id, href, mask)
    except TerradaptError as exc:
        log.warning("label %s not kept for few-shot adaptation: %s", label.acquisition_id, exc)
        return None
    if not config.due(count):
        return None
    kept = tuple(labels.list(label.region))
    base = registry.current(label.region)
    return few_shot_job(label.region, label.acquisition_id, count, base, kept, config)
