"""``terradapt ingest``: upload GeoTIFF acquisitions to object storage and announce them as STAC items on Kafka.

The acquisition id is derived from the region and the file's sha256, so ingesting the same file twice gives the
same id and the same object key (idempotent). Messages are keyed by region (a region's tiles stay in order on one
partition) and sent with acks=all from an idempotent producer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaProducer

from serving.store import BlobStore
from terradapt.records import Acquisition, check_region


def _header(data: bytes) -> tuple[tuple[float, float, float, float], str | None, tuple[str, ...]]:
    """Bounds, CRS and band names from the GeoTIFF header.

    Unreadable files still get ingested: the worker dead-letters them with the reason, so nothing disappears at
    the edge.
    """
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as mem, mem.open() as src:
            b = src.bounds
            names = tuple(d or f"band{i + 1}" for i, d in enumerate(src.descriptions))
            return (b.left, b.bottom, b.right, b.top), (src.crs.to_string() if src.crs else None), names
    except (RasterioError, ValueError):
        return (0.0, 0.0, 0.0, 0.0), None, ()


def acquisition_for(data: bytes, region: str, href: str, when: datetime | None = None) -> Acquisition:
    """The STAC item of one file (id = region + content hash)."""
    sha = hashlib.sha256(data).hexdigest()
    bbox, crs, bands = _header(data)
    return Acquisition(
        id=f"{region}-{sha[:20]}",
        region=region,
        datetime=when or datetime.now(UTC),
        bbox=bbox,
        crs=crs,
        bands=bands or ("red", "green", "blue", "nir", "elevation"),
        href=href,
        sha256=sha,
    )


def make_producer(bootstrap: str) -> KafkaProducer:
    """Idempotent, acks=all producer (kafka-python 3.x)."""
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        retries=5,
        linger_ms=5,
        client_id="terradapt-ingest",
    )


def ingest(
    paths: Iterable[Path],
    region: str,
    store: BlobStore,
    producer: KafkaProducer,
    topic: str,
    on_file: Callable[[Acquisition], None] | None = None,
) -> list[Acquisition]:
    """Upload every file and publish its acquisition; return the acquisitions in order."""
    check_region(region)
    out = []
    for path in paths:
        data = Path(path).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = f"{region}/{region}-{sha[:20]}.tif"
        href = store.put(key, data, "image/tiff")
        acq = acquisition_for(data, region, href)
        producer.send(topic, key=region.encode(), value=acq.to_json()).get(timeout=30)
        out.append(acq)
        if on_file is not None:
            on_file(acq)
    producer.flush()
    return out
