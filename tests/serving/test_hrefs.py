"""The href policy: only allowed buckets, only regular files inside the configured root, bounded reads."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from serving.hrefs import HrefPolicy, HrefReader
from terradapt.errors import ForbiddenHrefError, ObjectNotFoundError, OversizedTileError


class _Response:
    """A minio response whose body may be larger than its stat said (an object replaced between the calls)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.streamed = 0
        self.closed = False

    def stream(self, amt: int):
        for i in range(0, len(self.data), amt):
            self.streamed += 1
            yield self.data[i : i + amt]

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


class _Client:
    def __init__(self, objects: dict[tuple[str, str], bytes], stat_sizes: dict[tuple[str, str], int] | None = None):
        self.objects = objects
        self.stat_sizes = stat_sizes or {}
        self.calls: list[tuple[str, str, str]] = []
        self.responses: list[_Response] = []

    def stat_object(self, bucket: str, key: str):
        self.calls.append(("stat", bucket, key))
        if (bucket, key) not in self.objects:
            from minio.error import S3Error

            raise S3Error(cast(Any, None), "NoSuchKey", "missing", key, "r", "h")
        return SimpleNamespace(size=self.stat_sizes.get((bucket, key), len(self.objects[bucket, key])))

    def get_object(self, bucket: str, key: str):
        self.calls.append(("get", bucket, key))
        response = _Response(self.objects[bucket, key])
        self.responses.append(response)
        return response


@pytest.fixture
def root(tmp_path: Path) -> Path:
    inside = tmp_path / "tiles"
    (inside / "D033").mkdir(parents=True)
    (inside / "D033" / "a.tif").write_bytes(b"tile-a")
    (tmp_path / "secret.txt").write_bytes(b"do not read")
    return inside


def _reader(root: Path | None = None, client=None, max_bytes: int = 1024, buckets=("acq",)) -> HrefReader:
    return HrefReader(client, HrefPolicy(buckets=frozenset(buckets), file_root=root, max_bytes=max_bytes))


def test_objects_in_allowed_buckets_are_read_and_others_refused_before_any_request():
    client = _Client({("acq", "D033/a.tif"): b"x" * 10, ("models", "D033/weights"): b"w"})
    reader = _reader(client=client)
    assert reader.get("s3://acq/D033/a.tif") == b"x" * 10
    client.calls.clear()
    for href in ("s3://models/D033/weights", "s3://acq", "s3://acq/", "http://127.0.0.1:19000/acq/D033/a.tif"):
        with pytest.raises(ForbiddenHrefError) as info:
            reader.get(href)
        assert info.value.reason == "forbidden_href"
        assert "s3://{acq}/<key>" in str(info.value)
    assert client.calls == []  # refused from the href alone
    with pytest.raises(ObjectNotFoundError):
        reader.get("s3://acq/D033/missing.tif")


def test_an_object_larger_than_the_limit_is_refused_from_its_stat_without_downloading():
    client = _Client({("acq", "big.tif"): b"x" * 5000})
    with pytest.raises(OversizedTileError, match="5000"):
        _reader(client=client).get("s3://acq/big.tif")
    assert [c[0] for c in client.calls] == ["stat"]


def test_a_read_stops_past_the_limit_even_when_the_stat_said_small():
    client = _Client({("acq", "grown.tif"): b"x" * (4 << 20)}, stat_sizes={("acq", "grown.tif"): 10})
    with pytest.raises(OversizedTileError):
        _reader(client=client, max_bytes=1 << 20).get("s3://acq/grown.tif")
    response = client.responses[0]
    assert response.closed and response.streamed == 2  # stopped at the first chunk past the limit, not at the end


def test_file_hrefs_are_refused_unless_a_root_is_configured(root: Path):
    href = (root / "D033" / "a.tif").as_uri()
    with pytest.raises(ForbiddenHrefError, match="file:// hrefs are off"):
        _reader(None).get(href)
    assert _reader(root).get(href) == b"tile-a"


@pytest.mark.parametrize(
    "href",
    [
        "file:///etc/passwd",
        "file:///dev/zero",
        "file:///proc/self/environ",
        "file://{root}/../secret.txt",
        "file://{root}/D033/../../secret.txt",
        "file://{root}/%2e%2e/secret.txt",
        "file://{root}/link-out",
        "file://{root}/zero-link",
        "file://{root}/D033",
        "file://{root}",
        "file://{root}/fifo",
        "file://otherhost{root}/D033/a.tif",
        "file://{root}/D033/a.tif?x=1",
        "file://{root}/D033/a.tif\x00.png",
    ],
)
def test_file_hrefs_outside_the_root_or_not_regular_files_are_refused(root: Path, href: str):
    (root / "link-out").symlink_to(root.parent / "secret.txt")
    (root / "zero-link").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo")  # opening a FIFO for reading would block forever without O_NONBLOCK
    with pytest.raises(ForbiddenHrefError) as info:
        _reader(root).get(href.format(root=root))
    assert info.value.reason == "forbidden_href"


def test_a_symlink_that_stays_inside_the_root_is_followed(root: Path):
    (root / "alias.tif").symlink_to(root / "D033" / "a.tif")
    assert _reader(root).get((root / "alias.tif").as_uri()) == b"tile-a"


def test_a_large_file_is_refused_from_its_size_and_a_missing_one_is_not_found(root: Path):
    (root / "big.tif").write_bytes(b"x" * 5000)
    with pytest.raises(OversizedTileError, match="5000"):
        _reader(root).get((root / "big.tif").as_uri())
    with pytest.raises(ObjectNotFoundError):
        _reader(root).get((root / "D033" / "nope.tif").as_uri())


def test_other_schemes_and_non_strings_are_refused(root: Path):
    reader = _reader(root, client=_Client({}))
    for href in ("/etc/passwd", "D033/a.tif", "memory://acq/x", "ftp://h/x", "", "s3:/acq/x"):
        with pytest.raises(ForbiddenHrefError):
            reader.get(href)
