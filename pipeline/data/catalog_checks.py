"""Checks of catalog data: names and shard URLs safe to use as paths, and typed fields of the JSON.

A catalog is data, possibly edited by hand or tampered with, so everything read from it is checked
before use; each error names the field and what is expected. Used by :mod:`pipeline.data.catalog`.
"""

from __future__ import annotations

import re
from typing import Any

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_LEN = 128


def validate_name(name: str, what: str = "dataset name") -> str:
    """Return name if it is safe as one path component of a URL, else raise ValueError.

    Allowed: ``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128 characters, no ``..``; so no slashes,
    spaces, leading dots or traversal.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} is empty: use letters, digits, '.', '_' or '-'")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"{what} {name!r} is longer than {MAX_NAME_LEN} characters")
    if "/" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} contains a slash: it must be a single path component")
    if ".." in name:
        raise ValueError(f"{what} {name!r} contains '..': not allowed in names")
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is invalid: it must match [A-Za-z0-9][A-Za-z0-9._-]* "
            "(start with a letter or digit; then letters, digits, '.', '_' or '-')"
        )
    return name


def validate_shard_url(url: str, dataset: str, split: str) -> str:
    """Return url if it is ``<root>/<dataset>/<split>-NNNNNN.tar`` with no traversal, else raise ValueError.

    A catalog is data, possibly edited by hand or tampered with: a shard URL outside its
    dataset's directory would make readers fetch, and ``datasets remove`` delete, objects that
    belong to something else.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"dataset {dataset!r} split {split!r}: shard URL {url!r} is not a non-empty string")
    if any(ord(ch) < 32 or ch == "\\" for ch in url):
        raise ValueError(f"dataset {dataset!r}: shard URL {url!r} contains a backslash or a control character")
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme not in ("s3", "file"):
            raise ValueError(f"dataset {dataset!r}: shard URL {url!r} has scheme {scheme!r}: expected s3://, file:// or a path")
        path = rest.split("/", 1)[1] if scheme == "s3" and "/" in rest else ("" if scheme == "s3" else rest)
    else:
        path = url
    parts = path.split("/")
    inner = parts if sep and scheme == "s3" else parts[1:]  # a local path may start at the root
    if any(part in (".", "..") for part in parts) or "" in inner:
        raise ValueError(f"dataset {dataset!r}: shard URL {url!r} has '.', '..' or empty path segments")
    expected = re.compile(rf"(?:^|/){re.escape(dataset)}/{re.escape(split)}-\d{{6}}\.tar$")
    if not expected.search(path):
        raise ValueError(
            f"dataset {dataset!r} split {split!r}: shard URL {url!r} is not inside the dataset's directory: "
            f"expected .../{dataset}/{split}-NNNNNN.tar"
        )
    return url


def require_keys(data: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")


def require_type(value: Any, kind: type, where: str, expected: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where} must be {expected}, got {type(value).__name__} {str(value)[:60]!r}")
    return value


def as_count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer, got {value!r}")
    return value
