"""Where an acquisition may be read from: the href policy every worker applies before touching storage.

Anyone who can publish on the acquisitions topic chooses the ``href`` a worker reads. So the reader accepts only
``s3://`` objects in the configured buckets (by default the acquisitions bucket) and, when an operator configures
a root folder, regular files inside it (``file://``). Sizes are checked before reading (a stat) and reads are
bounded by ``max_bytes`` whatever the stat said, so neither a large object nor a device file can exhaust memory.
Every refusal is a typed error whose reason ends up in the dead-letter record.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import unquote, urlparse

from terradapt.errors import ForbiddenHrefError, ObjectNotFoundError, OversizedTileError

_CHUNK = 1 << 20
_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}


class ObjectClient(Protocol):
    """What the reader needs of an S3 client (``minio.Minio``)."""

    def stat_object(self, bucket_name: str, object_name: str) -> Any:
        """The object's metadata (``size``)."""
        ...

    def get_object(self, bucket_name: str, object_name: str) -> Any:
        """A streaming response (``stream(amt)``, ``close()``, ``release_conn()``)."""
        ...


@dataclass(frozen=True)
class HrefPolicy:
    """What a reader may open.

    Attributes:
        buckets: Buckets ``s3://`` hrefs may name.
        file_root: Folder ``file://`` hrefs must resolve inside (symlinks followed, then checked); None = refused.
        max_bytes: Largest object read; larger ones are refused from their stat, and reads stop past it.

    """

    buckets: frozenset[str] = field(default_factory=frozenset)
    file_root: Path | None = None
    max_bytes: int = 64 * 1024 * 1024

    def accepted(self) -> str:
        """What an href may be, for error messages."""
        where = [f"s3://{{{','.join(sorted(self.buckets))}}}/<key>"] if self.buckets else []
        if self.file_root is not None:
            where.append(f"file://{self.file_root}/...")
        return " or ".join(where) or "nothing (no bucket or file root configured)"


def read_bounded(chunks: Iterable[bytes], limit: int, what: str) -> bytes:
    """Join chunks, refusing as soon as more than ``limit`` bytes arrived."""
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) > limit:
            raise OversizedTileError("bytes", f">{limit}", f"at most {limit} bytes ({what} kept growing)")
    return bytes(out)


class HrefReader:
    """Reads the object an acquisition's href names, within an ``HrefPolicy``."""

    def __init__(self, client: ObjectClient | None, policy: HrefPolicy) -> None:
        self.client = client
        self.policy = policy

    def get(self, href: str) -> bytes:
        """The object's bytes.

        Raises:
            ForbiddenHrefError: The scheme, bucket or path is outside the policy.
            OversizedTileError: The object is larger than ``max_bytes``.
            ObjectNotFoundError: It does not exist.

        """
        if not isinstance(href, str) or "\x00" in href:
            raise ForbiddenHrefError(repr(href)[:200], self.policy.accepted())
        if href.startswith("s3://"):
            return self._get_s3(href)
        if href.startswith("file://"):
            return self._get_file(href)
        raise ForbiddenHrefError(href, self.policy.accepted())

    # -- s3 --------------------------------------------------------------------------------------------------------
    def _get_s3(self, href: str) -> bytes:
        bucket, _, key = href[len("s3://") :].partition("/")
        if not key or bucket not in self.policy.buckets:
            raise ForbiddenHrefError(href, self.policy.accepted())
        if self.client is None:
            raise ForbiddenHrefError(href, "an object store client (TERRADAPT_S3__* credentials)")
        from minio.error import S3Error

        limit = self.policy.max_bytes
        try:
            size = int(self.client.stat_object(bucket, key).size or 0)
            if size > limit:
                raise OversizedTileError("bytes", size, f"at most {limit} bytes")
            response = self.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise ObjectNotFoundError(href) from None
            raise
        try:
            return read_bounded(response.stream(_CHUNK), limit, href)
        finally:
            response.close()
            response.release_conn()

    # -- file ------------------------------------------------------------------------------------------------------
    def _get_file(self, href: str) -> bytes:
        root = self.policy.file_root
        if root is None:
            raise ForbiddenHrefError(href, self.policy.accepted() + " (file:// hrefs are off: set stream.file_root)")
        parsed = urlparse(href)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise ForbiddenHrefError(href, self.policy.accepted())
        raw = unquote(parsed.path)
        if ".." in Path(raw).parts or "\x00" in raw:
            raise ForbiddenHrefError(href, self.policy.accepted() + " (no '..')")
        base = root.resolve()
        path = Path(os.path.realpath(raw))  # follows every symlink; the result must still be inside the root
        if not path.is_relative_to(base) or path == base:
            raise ForbiddenHrefError(href, self.policy.accepted())
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise ObjectNotFoundError(href) from None
        except OSError as exc:  # a symlink swapped in after the check, a permission problem...
            raise ForbiddenHrefError(href, f"{self.policy.accepted()} ({exc.strerror})") from None
        info = os.fstat(fd)  # of what was opened, not of what the path names now
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ForbiddenHrefError(href, "a regular file (not a device, pipe, socket or folder)")
        if info.st_size > self.policy.max_bytes:
            os.close(fd)
            raise OversizedTileError("bytes", info.st_size, f"at most {self.policy.max_bytes} bytes")
        with os.fdopen(fd, "rb", buffering=0) as fh:
            return read_bounded(_read_chunks(fh), self.policy.max_bytes, href)


def _read_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(_CHUNK):
        yield chunk
