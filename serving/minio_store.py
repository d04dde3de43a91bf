"""MinIO (S3) blob store: the registry's and the stream's objects in buckets.

Imported only where the minio client is needed. Credentials come from ``S3Config`` (the environment or a
settings file), never from code, and are never logged.
"""

from __future__ import annotations

import io

from minio import Minio
from minio.error import S3Error

from terradapt.errors import ObjectNotFoundError
from terradapt.settings import S3Config

_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}


def minio_client(config: S3Config) -> Minio:
    """A client for the configured endpoint; refuses to build one without credentials."""
    if config.access_key is None or config.secret_key is None:
        raise ValueError(
            "S3 credentials missing: set TERRADAPT_S3__ACCESS_KEY and TERRADAPT_S3__SECRET_KEY "
            "(bash deploy/local/services.sh env prints them for the local MinIO)"
        )
    return Minio(
        config.endpoint,
        access_key=config.access_key.get_secret_value(),
        secret_key=config.secret_key.get_secret_value(),
        secure=config.secure,
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (bucket, key); raise ValueError naming the accepted form."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"uri={uri!r}; accepted: s3://<bucket>/<key>")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


class MinioStore:
    """One bucket as a blob store. A PUT is atomic in S3: readers see the whole old or the whole new object."""

    def __init__(self, client: Minio, bucket: str, *, create: bool = True) -> None:
        self.client = client
        self.bucket = bucket
        if create and not client.bucket_exists(bucket):
            try:
                client.make_bucket(bucket)
            except S3Error as exc:  # created concurrently by another worker
                if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise ObjectNotFoundError(self.uri(key)) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        return self.uri(key)

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING or exc.code == "NoSuchKey":
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        return sorted(str(o.object_name) for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True))

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class HrefReader:
    """Reads the object an acquisition's href names: ``s3://bucket/key`` (MinIO) or ``file://`` paths."""

    def __init__(self, client: Minio | None) -> None:
        self.client = client
        self._stores: dict[str, MinioStore] = {}

    def get(self, href: str) -> bytes:
        """The object's bytes; ObjectNotFoundError when it does not exist."""
        if href.startswith("file://"):
            from urllib.parse import unquote, urlparse

            path = unquote(urlparse(href).path)
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except FileNotFoundError:
                raise ObjectNotFoundError(href) from None
        bucket, key = parse_s3_uri(href)
        if self.client is None:
            raise ValueError(f"href {href!r} needs S3 credentials (TERRADAPT_S3__*)")
        store = self._stores.get(bucket)
        if store is None:
            store = self._stores[bucket] = MinioStore(self.client, bucket, create=False)
        return store.get(key)
