"""Blob stores: the small key/value interface the model registry and the stream's objects sit on.

Two implementations: the local file system (embedded mode, tests of the registry logic) and MinIO
(``serving.minio_store``, imported only where the minio client is needed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from terradapt.errors import ObjectNotFoundError


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
