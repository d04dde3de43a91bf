"""MinIO (S3) blob store: the registry's and the stream's objects in buckets.

Imported only where the minio client is needed. Credentials come from ``S3Config`` (the environment or a
settings file), never from code, and are never logged.
"""

from __future__ import annotations

import io

from minio import Minio
from minio.error import S3Error

from serving.store import ObjectInfo
from terradapt.errors import ObjectNotFoundError
from terradapt.settings import S3Config

_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}
_SHA256_META = "x-amz-meta-sha256"  # what ``put_with_sha256`` stores (minio adds the prefix)


def minio_client(config: S3Config) -> Minio:
    """A client for the configured endpoint; refuses to build one without credentials.

    Over TLS (``secure``) the endpoint's certificate is always verified: against ``ca_file`` when set, else against
    the system store (``SSL_CERT_FILE`` or certifi, minio's default).
    """
    if config.access_key is None or config.secret_key is None:
        raise ValueError(
            "S3 credentials missing: set TERRADAPT_S3__ACCESS_KEY and TERRADAPT_S3__SECRET_KEY "
            "(bash deploy/local/services.sh env prints them for the local MinIO)"
        )
    http_client = None
    if config.secure and config.ca_file is not None:
        # a private CA (the local TLS MinIO's): verify against it instead of the system store; the rest is
        # minio's own default pool (timeouts, retries on 5xx)
        import urllib3

        http_client = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=300, read=300),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(config.ca_file),
            retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
    return Minio(
        config.endpoint,
        access_key=config.access_key.get_secret_value(),
        secret_key=config.secret_key.get_secret_value(),
        secure=config.secure,
        http_client=http_client,
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

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and stored sha256 (``x-amz-meta-sha256``) of ``key``; None when the object or bucket is absent."""
        try:
            st = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise
        sha = st.metadata.get(_SHA256_META) if st.metadata is not None else None
        return ObjectInfo(size=int(st.size or 0), sha256=str(sha) if sha else None)

    def put_with_sha256(
        self, key: str, data: bytes, sha256: str, content_type: str = "application/octet-stream"
    ) -> str:
        """Write ``data`` with its sha256 as user metadata; create the bucket first if it is missing."""

        def put() -> None:
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata={"sha256": sha256}
            )

        try:
            put()
        except S3Error as exc:
            if exc.code != "NoSuchBucket":
                raise
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as again:  # created concurrently
                if again.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise
            put()
        return self.uri(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"
