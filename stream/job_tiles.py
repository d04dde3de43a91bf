"""What an adaptation job adapts on: its stream tiles read back from object storage, and its labelled tiles."""

from __future__ import annotations

import logging

import numpy as np

from adapters.buffer import BufferedTile
from serving.label_store import LabelStore
from serving.store import TileReader
from terradapt.errors import InvalidPayloadError, TerradaptError
from terradapt.raster import RasterSpec, read_raster
from terradapt.records import AdaptationJob

log = logging.getLogger("stream.pipeline")


def job_tiles(job: AdaptationJob, reader: TileReader, spec: RasterSpec) -> list[BufferedTile]:
    """The job's tiles read back from object storage; unreadable ones (expired, corrupt) are skipped and logged."""
    tiles = []
    for tile_id, href in zip(job.tile_ids, job.tile_hrefs, strict=False):
        try:
            raster = read_raster(reader.get(href), spec)
        except TerradaptError as exc:
            log.warning("job %s: tile %s unusable (%s)", job.job_id, tile_id, exc)
            continue
        tiles.append(BufferedTile(tile_id, raster.data.astype(np.uint8), href=href))
    return tiles


def labelled_tiles(job: AdaptationJob, labels: LabelStore | None, spec: RasterSpec) -> list[BufferedTile]:
    """A few-shot job's labelled tiles from the label store (none for a label-free job).

    Raises:
        InvalidPayloadError: the job names labelled tiles but there is no label store to read them from.

    """
    if not job.labels:
        return []
    if labels is None:
        raise InvalidPayloadError(f"job {job.job_id} names labelled tiles, but this pipeline has no label store")
    return labels.load(job.region, job.labels, spec)
