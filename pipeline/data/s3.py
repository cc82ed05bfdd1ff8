"""Object storage for the data plane: S3 through boto3 and plain local directories behind one URL API.

Every function here takes a URL that is either ``s3://bucket/key`` or a local location (``file:///abs``
or a plain path), so ingest, catalog and streaming work the same against SeaweedFS, AWS S3 or a
directory on disk.

Credentials come only from boto3's default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``);
the endpoint is an explicit ``endpoint_url`` argument, falling back to ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``. Failures surface as :class:`StorageError` whose message names the URL and the
endpoint and says what to check, and never contains credentials.

Importing this module registers an ``s3`` opener in ``webdataset.gopen.gopen_schemes`` so that
``webdataset.gopen.gopen("s3://...")`` streams objects with boto3.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn
from urllib.parse import unquote, urlparse

import boto3
import botocore.exceptions as bexc
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

DEFAULT_REGION = "us-east-1"
#: Parts smaller than 5 MiB are rejected by S3 (s3transfer also rounds up to it).
DEFAULT_MULTIPART_CHUNKSIZE = 8 * 1024 * 1024

# `webdataset.gopen` as an attribute is the gopen *function* (re-exported by the package); the
# dispatch table lives in the module of the same name.
_wds_gopen = importlib.import_module("webdataset.gopen")

_AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class StorageError(RuntimeError):
    """An object store or local directory could not be used; the message says what to check."""


class ObjectNotFoundError(StorageError):
    """The bucket exists (or the directory does) but the object at the URL does not."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD request tells us about an object."""

    url: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    #: A version token that changes whenever the object is rewritten: the S3 ETag, or size and
    #: mtime in nanoseconds for a local file (written through temp + rename, so every write is new).
    etag: str = ""


# --------------------------------------------------------------------------------------- URLs


def is_s3_url(url: str) -> bool:
    """True for ``s3://`` URLs; everything else is treated as a local path."""
    return str(url).startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")`` (key may be empty).

    Raises:
        ValueError: not an ``s3://`` URL or no bucket name.
    """
    parsed = urlparse(str(url))
    if parsed.scheme != "s3":
        raise ValueError(f"{url!r} is not an s3:// URL: expected s3://BUCKET/KEY")
    if not parsed.netloc:
        raise ValueError(f"{url!r} has no bucket: expected s3://BUCKET/KEY")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(url: str | os.PathLike[str]) -> Path:
    """The filesystem path for a ``file://`` URL or a plain path.

    Raises:
        ValueError: the URL has a scheme other than ``file``.
    """
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{text!r}: file:// URLs must be local (file:///abs/path)")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        # One-letter schemes are Windows drive letters, not URL schemes.
        raise ValueError(f"{text!r}: unsupported URL scheme {parsed.scheme!r}: use s3://, file:// or a path")
    return Path(text)


def absolute_location(url: str | os.PathLike[str]) -> str:
    """``s3://`` URLs unchanged; a local path or ``file://`` URL as an absolute path.

    Locations are pinned before anything is written to a catalog or shipped to Ray workers, whose
    working directory is not the caller's: a relative path would name another place there.
    """
    text = os.fspath(url)
    if is_s3_url(text):
        return text
    return str(local_path(text).expanduser().resolve())


def join_url(base: str, *parts: str) -> str:
    """Append path components to an S3 URL or a local path, with exactly one ``/`` between them."""
    base = str(base)
    cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
    if is_s3_url(base):
        return "/".join([base.rstrip("/")] + cleaned) if cleaned else base
    root = local_path(base)
    return str(root.joinpath(*cleaned))


def _redact(text: str) -> str:
    """Remove the secret key, should any library have echoed it into a message."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# ------------------------------------------------------------------------------------ clients


def endpoint_from_env() -> str | None:
    """The S3 endpoint from the environment (the same variables boto3 honours), or None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def make_s3_client(
    endpoint_url: str | None = None,
    *,
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """A boto3 S3 client with standard-mode retries and path-style addressing.

    Args:
        endpoint_url: S3 endpoint (``http://127.0.0.1:8333``); None reads ``AWS_ENDPOINT_URL_S3``,
            then ``AWS_ENDPOINT_URL``, then falls back to AWS itself.
        max_attempts: total attempts per request (first try included) for retryable errors;
            ``AWS_MAX_ATTEMPTS`` in the environment overrides it.
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for a response chunk.

    Clients are cached per process, endpoint and credentials (boto3 clients are thread-safe but
    must not cross a fork).
    """
    endpoint = endpoint_url or endpoint_from_env()
    # AWS_MAX_ATTEMPTS is boto's own knob; honour it over our default so operators can tune retries.
    max_attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or max_attempts)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    # The credentials are part of the cache key (hashed) so a changed environment takes effect.
    cred_fingerprint = hashlib.sha256(
        "\0".join(
            os.environ.get(k, "")
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        ).encode()
    ).hexdigest()
    key = (os.getpid(), endpoint, region, max_attempts, connect_timeout, read_timeout, cred_fingerprint)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                region_name=region,
                # total_max_attempts counts the first try; botocore's "max_attempts" key counts only retries.
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # Path style works with SeaweedFS/MinIO on loopback, where bucket subdomains do not resolve.
                s3={"addressing_style": "path"},
                max_pool_connections=32,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
        return client


def _endpoint_of(client: Any) -> str:
    return str(getattr(client.meta, "endpoint_url", None) or "the default AWS S3 endpoint")


def _error_code(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _storage_error(exc: BaseException, url: str, client: Any, action: str) -> StorageError:
    """Translate a boto3/botocore failure into a StorageError that says what to check."""
    endpoint = _endpoint_of(client)
    if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
        msg = (
            f"cannot {action} {url}: no S3 credentials found for endpoint {endpoint}; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
        return StorageError(msg)
    if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError)):
        msg = (
            f"cannot {action} {url}: the S3 endpoint {endpoint} is unreachable "
            f"({type(exc).__name__}); check that the server is running (`stamp stack status`) and "
            "that AWS_ENDPOINT_URL_S3 / --s3-endpoint points at it"
        )
        return StorageError(msg)
    if isinstance(exc, bexc.ClientError):
        code = _error_code(exc)
        bucket = parse_s3_url(url)[0] if is_s3_url(url) else "?"
        if code in _MISSING_BUCKET_CODES:
            return StorageError(
                f"cannot {action} {url}: bucket {bucket!r} does not exist at {endpoint}; create it "
                "(`stamp stack up` does) or check the bucket name in the URL"
            )
        if code in _AUTH_CODES:
            return StorageError(
                f"cannot {action} {url}: the S3 endpoint {endpoint} rejected the credentials "
                f"({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if code in _MISSING_KEY_CODES:
            return ObjectNotFoundError(f"cannot {action} {url}: no such object at {endpoint}")
        return StorageError(f"cannot {action} {url}: S3 endpoint {endpoint} answered {code}")
    return StorageError(f"cannot {action} {url}: {_redact(f'{type(exc).__name__}: {exc}')}")


def _bucket_missing(client: Any, bucket: str) -> bool:
    """HEAD answers a bare 404 for both a missing key and a missing bucket; ask about the bucket."""
    try:
        client.head_bucket(Bucket=bucket)
    except bexc.ClientError as exc:
        return _error_code(exc) in ({"404", "NoSuchBucket", "NotFound"})
    return False


def _raise_s3(exc: BaseException, url: str, client: Any, action: str) -> NoReturn:
    """Raise the StorageError for exc; `from None` because botocore chains can echo request data."""
    if isinstance(exc, bexc.ClientError) and _error_code(exc) in _MISSING_KEY_CODES:
        bucket, _ = parse_s3_url(url)
        try:
            missing = _bucket_missing(client, bucket)
        except Exception:  # noqa: BLE001 - the first error is the one worth reporting
            missing = False
        if missing:
            exc = bexc.ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket")
    raise _storage_error(exc, url, client, action) from None


_known_buckets: set[tuple[int, str]] = set()


def _require_bucket(client: Any, url: str, action: str) -> None:
    """Fail clearly before writing into a missing bucket.

    Some S3 servers (SeaweedFS) create a bucket on the first PUT into it, so a typo in a bucket
    name would silently scatter data; one HEAD per bucket and process keeps writes honest.
    """
    bucket, _ = parse_s3_url(url)
    key = (id(client), bucket)
    if key in _known_buckets:
        return
    try:
        missing = _bucket_missing(client, bucket)
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, url, client, action)
    if missing:
        _raise_s3(bexc.ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket"), url, client, action)
    _known_buckets.add(key)


# --------------------------------------------------------------------------------- operations


def create_bucket(bucket: str, *, endpoint_url: str | None = None, exist_ok: bool = True) -> None:
    """Create a bucket (idempotent by default)."""
    client = make_s3_client(endpoint_url)
    url = f"s3://{bucket}"
    try:
        client.create_bucket(Bucket=bucket)
    except bexc.ClientError as exc:
        if exist_ok and _error_code(exc) in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            return
        _raise_s3(exc, url, client, "create bucket")
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, url, client, "create bucket")


def head(url: str, *, endpoint_url: str | None = None) -> ObjectInfo | None:
    """Size and user metadata of the object at url, or None when it does not exist.

    Local files have no user metadata (an empty dict).

    Raises:
        StorageError: endpoint unreachable, bucket missing or credentials rejected.
    """
    if not is_s3_url(url):
        path = local_path(url)
        return ObjectInfo(url, path.stat().st_size, {}) if path.is_file() else None
    client = make_s3_client(endpoint_url)
    bucket, key = parse_s3_url(url)
    try:
        resp = client.head_object(Bucket=bucket, Key=key)
    except bexc.ClientError as exc:
        if _error_code(exc) in _MISSING_KEY_CODES:
            try:
                bucket_missing = _bucket_missing(client, bucket)
            except Exception as inner:  # noqa: BLE001 - translated below
                _raise_s3(inner, url, client, "read")
            if not bucket_missing:
                return None
        _raise_s3(exc, url, client, "read")
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, url, client, "read")
    meta = {str(k).lower(): str(v) for k, v in (resp.get("Metadata") or {}).items()}
    return ObjectInfo(url, int(resp.get("ContentLength", 0)), meta)


def exists(url: str, *, endpoint_url: str | None = None) -> bool:
    """True when an object (or local file) exists at url."""
    return head(url, endpoint_url=endpoint_url) is not None


def get_bytes(url: str, *, endpoint_url: str | None = None) -> bytes:
    """The whole content of an object or local file.

    Raises:
        ObjectNotFoundError: no object at url.
        StorageError: endpoint unreachable, bucket missing or credentials rejected.
    """
    if not is_s3_url(url):
        path = local_path(url)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"cannot read {url}: no such file") from None
        except OSError as exc:
            raise StorageError(f"cannot read {url}: {exc.strerror or exc}") from None
    client = make_s3_client(endpoint_url)
    bucket, key = parse_s3_url(url)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, url, client, "read")


def _write_local(url: str, write: Callable[[BinaryIO], object]) -> None:
    """Atomic write to a local destination; OS errors become StorageError naming the URL."""
    try:
        _atomic_local_write(local_path(url), write)
    except OSError as exc:
        raise StorageError(f"cannot write {url}: {exc.strerror or exc}") from None


def _atomic_local_write(path: Path, writer: Callable[[BinaryIO], object]) -> None:
    """Write through a temp file in the same directory, then rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def put_bytes(
    url: str,
    data: bytes,
    *,
    metadata: dict[str, str] | None = None,
    content_type: str = "application/octet-stream",
    endpoint_url: str | None = None,
) -> None:
    """Write data to url in one request (S3 PUT is atomic; local writes go through a temp + rename).

    Local files ignore metadata.
    """
    if not is_s3_url(url):
        _write_local(url, lambda fh: fh.write(data))
        return
    client = make_s3_client(endpoint_url)
    bucket, key = parse_s3_url(url)
    _require_bucket(client, url, "write")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=dict(metadata or {}), ContentType=content_type)
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, url, client, "write")


def upload_file(
    path: str | os.PathLike[str],
    url: str,
    *,
    metadata: dict[str, str] | None = None,
    endpoint_url: str | None = None,
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
    max_concurrency: int = 4,
) -> None:
    """Upload a local file to url: multipart above ``multipart_chunksize``.

    Retries are botocore's (standard mode, :func:`make_s3_client`): every request, each part of a
    multipart upload included, is retried on a dropped connection, a timeout or a 5xx/throttle
    answer, up to ``AWS_MAX_ATTEMPTS`` attempts. Local destinations are copied through a temp file
    and renamed.

    Raises:
        StorageError: after botocore's last attempt, or at once for a missing bucket / rejected credentials.
    """
    src = Path(path)
    if not is_s3_url(url):
        _write_local(url, lambda fh: _copy_into(src, fh))
        return
    client = make_s3_client(endpoint_url)
    bucket, key = parse_s3_url(url)
    _require_bucket(client, url, "upload to")
    config = TransferConfig(
        multipart_threshold=multipart_chunksize,
        multipart_chunksize=multipart_chunksize,
        max_concurrency=max_concurrency,
        use_threads=max_concurrency > 1,
    )
    extra = {"Metadata": dict(metadata or {})}
    try:
        client.upload_file(str(src), bucket, key, ExtraArgs=extra, Config=config)
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(_unwrap_transfer_error(exc), url, client, "upload to")


def _copy_into(src: Path, fh: BinaryIO) -> None:
    with src.open("rb") as in_fh:
        shutil.copyfileobj(in_fh, fh, length=1024 * 1024)


def _unwrap_transfer_error(exc: BaseException) -> BaseException:
    """s3transfer wraps the botocore error (S3UploadFailedError); find the original for classification."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (bexc.ClientError, bexc.BotoCoreError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def delete(url: str, *, endpoint_url: str | None = None) -> None:
    """Delete an object or local file; a missing one is not an error."""
    if not is_s3_url(url):
        local_path(url).unlink(missing_ok=True)
        return
    client = make_s3_client(endpoint_url)
    bucket, key = parse_s3_url(url)
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, url, client, "delete")


def list_urls(prefix_url: str, *, endpoint_url: str | None = None) -> list[str]:
    """All object URLs under a prefix (recursive), sorted. A missing local directory lists as empty."""
    if not is_s3_url(prefix_url):
        root = local_path(prefix_url)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    return sorted(f"s3://{bucket}/{obj['Key']}" for bucket, obj in _list_s3(prefix_url, endpoint_url))


def _list_s3(prefix_url: str, endpoint_url: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``(bucket, object record)`` for every object under an s3:// prefix, page by page."""
    client = make_s3_client(endpoint_url)
    bucket, prefix = parse_s3_url(prefix_url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    found: list[tuple[str, dict[str, Any]]] = []
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            found.extend((bucket, obj) for obj in page.get("Contents", []))
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, prefix_url, client, "list")
    return found


def list_objects(prefix_url: str, *, endpoint_url: str | None = None) -> list[ObjectInfo]:
    """Every object under a prefix (recursive) with its size and version token (:attr:`ObjectInfo.etag`),
    sorted by URL; one LIST request per 1,000 objects on S3. A missing local directory lists as empty.
    Local dot-files (temp files of an atomic write in progress) are left out."""
    if not is_s3_url(prefix_url):
        root = local_path(prefix_url)
        if not root.is_dir():
            return []
        found = []
        for p in sorted(root.rglob("*")):
            try:
                st = p.stat()
            except FileNotFoundError:  # replaced or removed while listing
                continue
            if p.is_file() and not p.name.startswith("."):
                found.append(ObjectInfo(str(p), st.st_size, {}, f"{st.st_size}-{st.st_mtime_ns}"))
        return found
    infos = [ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj.get("Size", 0)), {}, str(obj.get("ETag", "")).strip('"'))
             for bucket, obj in _list_s3(prefix_url, endpoint_url)]
    return sorted(infos, key=lambda i: i.url)


def open_read(url: str, *, endpoint_url: str | None = None, start: int = 0) -> BinaryIO:
    """A streaming, read-only file object for url (boto3 streaming body or a local file).

    Args:
        start: first byte to read; > 0 asks S3 for a ranged GET (``Range: bytes=start-``), so a
            reader can continue an object where an earlier, closed reader stopped.

    Raises:
        ObjectNotFoundError: no object at url.
        StorageError: endpoint unreachable, bucket missing or credentials rejected.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start} for {url}")
    if not is_s3_url(url):
        try:
            fh = local_path(url).open("rb")
        except FileNotFoundError:
            raise ObjectNotFoundError(f"cannot read {url}: no such file") from None
        fh.seek(start)
        return fh
    client = make_s3_client(endpoint_url)
    bucket, key = parse_s3_url(url)
    try:
        ranged = {"Range": f"bytes={start}-"} if start else {}
        body = client.get_object(Bucket=bucket, Key=key, **ranged)["Body"]
    except Exception as exc:  # noqa: BLE001 - translated below
        _raise_s3(exc, url, client, "read")
    return _buffered(_BufferedBody(body))


class _BufferedBody(io.RawIOBase):
    """Adapts a botocore StreamingBody to a raw stream so io.BufferedReader can batch tarfile's small reads."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _buffered(raw: io.RawIOBase, bufsize: int = 1024 * 1024) -> BinaryIO:
    return io.BufferedReader(raw, buffer_size=bufsize)  # type: ignore[arg-type, return-value]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- webdataset


def register_gopen_s3(endpoint_url: str | None = None) -> None:
    """Make ``webdataset.gopen.gopen`` open ``s3://`` URLs with boto3 (streamed, 1 MiB buffered).

    Args:
        endpoint_url: endpoint for s3:// URLs unless a call passes ``endpoint_url=``; None resolves
            it from the environment per call.
    """

    def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
        if mode != "rb":
            raise ValueError(f"{url}: the s3 opener only reads (mode 'rb'), got mode {mode!r}")
        return open_read(url, endpoint_url=kw.get("endpoint_url") or endpoint_url, start=int(kw.get("start", 0)))

    _wds_gopen.gopen_schemes["s3"] = _gopen_s3


def open_stream(url: str, *, endpoint_url: str | None = None, start: int = 0) -> BinaryIO:
    """Open url for streaming reads from byte ``start``: ``s3://`` through the opener registered in
    webdataset's gopen table (a ranged GET when ``start > 0``), local files directly with a 1 MiB
    buffer (gopen's default 8 KiB buffer makes tarfile's small reads noticeably slower than S3 over
    loopback)."""
    if is_s3_url(url):
        return _wds_gopen.gopen(url, "rb", endpoint_url=endpoint_url, start=start)  # type: ignore[no-any-return]
    try:
        fh = local_path(url).open("rb", buffering=1024 * 1024)
    except FileNotFoundError:
        raise ObjectNotFoundError(f"cannot read {url}: no such file") from None
    fh.seek(start)
    return fh


register_gopen_s3()
