"""Blob stores: the small key/value interface the model registry and the stream's objects sit on.

Three implementations: the local file system (embedded mode's registry, tests of the registry logic), memory (the
embedded runner's acquisitions, with a bounded retention) and MinIO (``serving.minio_store``, imported only where
the minio client is needed).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from terradapt.errors import ObjectNotFoundError


class TileReader(Protocol):
    """Reads the object a message's ``href`` names (``s3://``, ``file://``, ``memory://``...)."""

    def get(self, href: str) -> bytes:
        """The object's bytes; ObjectNotFoundError when it does not exist."""
        ...


@runtime_checkable
class BlobStore(Protocol):
    """Keys are '/'-separated paths inside one bucket or folder."""

    def get(self, key: str) -> bytes:
        """Return the bytes of ``key``; raise ObjectNotFoundError when absent."""
        ...

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Write ``data`` at ``key`` atomically (readers see the old or the new object); return its URI."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursive), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        ...

    def uri(self, key: str) -> str:
        """A URI naming ``key`` (file:// or s3://)."""
        ...


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it: its size and the sha256 it was stored with."""

    size: int
    sha256: str | None  # None: stored without the checksum (an object written by something else)


@runtime_checkable
class ChecksummedStore(Protocol):
    """A store that keeps each object's sha256 beside it, so a writer can tell "already stored" from a collision.

    ``terradapt ingest`` uses it to skip uploads on a re-run without reading the objects back.
    """

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and stored sha256 of ``key``; None when absent."""
        ...

    def put_with_sha256(
        self, key: str, data: bytes, sha256: str, content_type: str = "application/octet-stream"
    ) -> str:
        """Write ``data`` at ``key`` with its sha256 kept as metadata; return its URI."""
        ...

    def uri(self, key: str) -> str:
        """A URI naming ``key``."""
        ...


class FileSystemStore:
    """A folder as a blob store; writes go to a temporary file then ``os.replace`` (atomic on POSIX)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"key {key!r} escapes the store root")
        return path

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(self.uri(key)) from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return self.uri(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root.resolve()
        start = self._path(prefix) if prefix else base
        folder = start if start.is_dir() else start.parent
        if not folder.exists():
            return []
        keys = (p.relative_to(base).as_posix() for p in folder.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(".tmp-"))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return (self.root.resolve() / key).as_uri()


class MemoryStore:
    """Objects in memory, ``memory://<name>/<key>`` URIs; optionally bounded per first key segment.

    ``per_prefix`` keeps only the most recent objects under each first segment of their keys (a region, in the
    embedded runner's ``<region>/<acquisition>.tif`` layout), like an object-lifecycle rule on a bucket: a
    stream that never ends does not fill memory, and whatever reads an expired object gets
    ``ObjectNotFoundError`` as it would from S3.
    """

    def __init__(self, name: str = "objects", *, per_prefix: int | None = None) -> None:
        if per_prefix is not None and per_prefix < 1:
            raise ValueError(f"per_prefix={per_prefix}; accepted: >= 1 or None")
        self.name = name
        self.per_prefix = per_prefix
        self._objects: dict[str, bytes] = {}
        self._order: dict[str, OrderedDict[str, None]] = {}
        self._lock = threading.Lock()

    def key_of(self, uri: str) -> str:
        """The key a ``memory://`` URI of this store names."""
        prefix = f"memory://{self.name}/"
        if not uri.startswith(prefix):
            raise ValueError(f"uri={uri!r}; accepted: {prefix}<key>")
        return uri[len(prefix) :]

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ObjectNotFoundError(self.uri(key)) from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        group = key.split("/", 1)[0]
        with self._lock:
            self._objects[key] = bytes(data)
            order = self._order.setdefault(group, OrderedDict())
            order[key] = None
            order.move_to_end(key)
            while self.per_prefix is not None and len(order) > self.per_prefix:
                old, _ = order.popitem(last=False)
                self._objects.pop(old, None)
        return self.uri(key)

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)
            self._order.get(key.split("/", 1)[0], OrderedDict()).pop(key, None)

    def uri(self, key: str) -> str:
        return f"memory://{self.name}/{key}"

    def __len__(self) -> int:
        return len(self._objects)


class MemoryReader:
    """A ``TileReader`` over the ``memory://`` URIs of a ``MemoryStore``."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def get(self, href: str) -> bytes:
        try:
            key = self.store.key_of(href)
        except ValueError:
            raise ObjectNotFoundError(href) from None
        return self.store.get(key)
