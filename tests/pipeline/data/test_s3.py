"""Tests for pipeline.data.s3: URL helpers, local storage, and real S3 (SeaweedFS) including failure messages."""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

from pipeline.data import s3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------- URL helpers


def test_parse_s3_url_splits_bucket_and_key() -> None:
    assert s3.parse_s3_url("s3://bkt/a/b/c.tar") == ("bkt", "a/b/c.tar")
    assert s3.parse_s3_url("s3://bkt") == ("bkt", "")
    assert s3.parse_s3_url("s3://bkt/") == ("bkt", "")


@pytest.mark.parametrize(
    ("url", "message"),
    [("http://x/y", "is not an s3:// URL"), ("s3:///key", "has no bucket"), ("/tmp/x", "is not an s3:// URL")],
)
def test_parse_s3_url_rejects_malformed(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        s3.parse_s3_url(url)


def test_join_url_and_local_path(tmp_path: Path) -> None:
    assert s3.join_url("s3://b/p/", "ds", "train-000000.tar") == "s3://b/p/ds/train-000000.tar"
    assert s3.join_url("s3://b", "catalog.json") == "s3://b/catalog.json"
    assert s3.join_url(str(tmp_path), "ds", "x.tar") == str(tmp_path / "ds" / "x.tar")
    assert s3.join_url(f"file://{tmp_path}", "x") == str(tmp_path / "x")
    assert s3.local_path(f"file://{tmp_path}/a%20b") == tmp_path / "a b"
    with pytest.raises(ValueError, match="unsupported URL scheme 'gs'"):
        s3.local_path("gs://bucket/x")


# ------------------------------------------------------------------------------- local storage


def test_local_put_get_head_list_delete(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root/ds/a.bin"
    s3.put_bytes(url, b"hello")
    assert s3.get_bytes(url) == b"hello"
    assert s3.exists(url)
    info = s3.head(url)
    assert info is not None and info.size == 5
    s3.put_bytes(str(tmp_path / "root" / "ds" / "b.bin"), b"x")
    assert s3.list_urls(str(tmp_path / "root")) == [
        str(tmp_path / "root" / "ds" / "a.bin"),
        str(tmp_path / "root" / "ds" / "b.bin"),
    ]
    s3.delete(url)
    s3.delete(url)  # deleting twice is fine
    assert not s3.exists(url)
    assert s3.head(url) is None
    with pytest.raises(s3.ObjectNotFoundError, match="no such file"):
        s3.get_bytes(url)
    assert s3.list_urls(str(tmp_path / "nowhere")) == []


def test_local_upload_file_is_atomic_copy(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    dest = tmp_path / "out" / "dest.bin"
    s3.upload_file(src, str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["dest.bin"]  # no temp leftovers


# ---------------------------------------------------------------------------------- real S3


@pytest.mark.integration
def test_s3_put_get_head_list_delete(seaweedfs: object, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/p/ds/a.bin"
    assert not s3.exists(url)
    assert s3.head(url) is None
    s3.put_bytes(url, b"payload", metadata={"sha256": "abc"})
    assert s3.get_bytes(url) == b"payload"
    info = s3.head(url)
    assert info is not None
    assert (info.size, info.metadata) == (7, {"sha256": "abc"})
    s3.put_bytes(f"s3://{s3_bucket}/p/ds/b.bin", b"b")
    s3.put_bytes(f"s3://{s3_bucket}/p/dsx/c.bin", b"c")
    assert s3.list_urls(f"s3://{s3_bucket}/p/ds") == [url, f"s3://{s3_bucket}/p/ds/b.bin"]
    s3.delete(url)
    assert not s3.exists(url)
    with pytest.raises(s3.ObjectNotFoundError, match=f"s3://{s3_bucket}/p/ds/a.bin"):
        s3.get_bytes(url)


@pytest.mark.integration
def test_s3_multipart_upload_round_trip(seaweedfs: object, s3_bucket: str, tmp_path: Path) -> None:
    data = os.urandom(11 * 1024 * 1024 + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    url = f"s3://{s3_bucket}/big.bin"
    sha = hashlib.sha256(data).hexdigest()
    s3.upload_file(src, url, metadata={"sha256": sha}, multipart_chunksize=5 * 1024 * 1024)
    assert hashlib.sha256(s3.get_bytes(url)).hexdigest() == sha
    info = s3.head(url)
    assert info is not None and info.metadata["sha256"] == sha and info.size == len(data)


@pytest.mark.integration
def test_webdataset_gopen_streams_s3_objects(seaweedfs: object, s3_bucket: str, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("000.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"7"))
    url = f"s3://{s3_bucket}/x.tar"
    s3.put_bytes(url, buf.getvalue())
    gopen_module = importlib.import_module("webdataset.gopen")
    with gopen_module.gopen(url) as stream:
        assert stream.read() == buf.getvalue()
    with s3.open_stream(url) as stream:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            member = next(iter(tar))
            payload = tar.extractfile(member)
            assert payload is not None
            assert (member.name, payload.read()) == ("000.cls", b"7")
    # A ranged read continues an object where a closed reader stopped (S3 and local alike).
    local = tmp_path / "x.tar"
    local.write_bytes(buf.getvalue())
    for where in (url, str(local)):
        with s3.open_stream(where, start=512) as stream:
            assert stream.read() == buf.getvalue()[512:]
    with pytest.raises(ValueError, match="start must be >= 0, got -1"):
        s3.open_read(url, start=-1)


@pytest.mark.integration
def test_missing_bucket_error_names_url_and_fix(seaweedfs: object) -> None:
    url = "s3://no-such-bucket-stamp/x/catalog.json"
    for call in (lambda: s3.get_bytes(url), lambda: s3.head(url), lambda: s3.put_bytes(url, b"x")):
        with pytest.raises(s3.StorageError) as info:
            call()
        message = str(info.value)
        assert not isinstance(info.value, s3.ObjectNotFoundError)
        assert url in message
        assert "bucket 'no-such-bucket-stamp' does not exist" in message
        assert seaweedfs.endpoint_url in message  # type: ignore[attr-defined]


@pytest.mark.integration
@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_wrong_credentials_error_never_shows_secret(
    seaweedfs: object, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    wrong_secret = "WRONG-secret-value-1234567890"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    if which == "access_key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEYID")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = f"s3://{s3_bucket}/catalog.json"
    with pytest.raises(s3.StorageError) as info:
        s3.put_bytes(url, b"{}")
    message = str(info.value)
    assert url in message
    assert "rejected the credentials" in message
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    assert wrong_secret not in message
    assert wrong_secret not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.integration
def test_unreachable_endpoint_error_names_endpoint(monkeypatch: pytest.MonkeyPatch, seaweedfs: object) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{_free_port()}"
    url = "s3://bucket/ds/train-000000.tar"
    with pytest.raises(s3.StorageError) as info:
        s3.get_bytes(url, endpoint_url=endpoint)
    message = str(info.value)
    assert url in message and endpoint in message
    assert "unreachable" in message and "AWS_ENDPOINT_URL_S3" in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message


def test_unreachable_endpoint_without_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(s3.StorageError, match=r"the S3 endpoint http://127\.0\.0\.1:\d+ is unreachable") as info:
        s3.head("s3://b/k", endpoint_url=endpoint)
    assert "super-secret-value" not in str(info.value)
