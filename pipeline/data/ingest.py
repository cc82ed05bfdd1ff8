"""Ingest: turn an in-memory dataset into WebDataset tar shards on S3 (or a directory) plus a catalog entry.

Layout: ``<dest>/<dataset>/<split>-NNNNNN.tar``, each sample ``{__key__, png, cls}``. The order of
operations makes ingest safe to interrupt and to repeat:

1. Shards are encoded deterministically (fixed PNG settings, tar members with zero mtime/uid/gid),
   so identical data gives byte-identical shards and the same sha256.
2. A shard whose object already exists with the same sha256 (S3 user metadata; recomputed for
   local files) is not uploaded again.
3. Before the first shard that the *current* catalog entry references is overwritten with
   different bytes, that entry is withdrawn from the catalog: readers never see an entry whose
   shards are half replaced.
4. The dataset's catalog entry object is written last (atomically; see
   :mod:`pipeline.data.catalog_store`, which is what makes concurrent ingests safe), the index is
   rewritten (unless the caller batches that), then stale shards left by an earlier, larger ingest
   of the same dataset are deleted.

An interrupted ingest therefore leaves either the previous complete entry or no entry, never one
pointing at missing or partial shards, and re-running it completes the job.
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.data import s3
from pipeline.data.catalog import (
    Catalog,
    CatalogEntry,
    ShardInfo,
    SplitInfo,
    catalog_url_for,
    utc_now,
    validate_name,
)
from pipeline.data.catalog_store import compact as compact_catalog
from pipeline.data.catalog_store import delete_entry, load_entry, put_entry
from pipeline.data.sources import ArrayDataset, load_source

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5000
SHARD_NAME_RE = re.compile(r"^(?P<split>[A-Za-z0-9][A-Za-z0-9._-]*)-(?P<index>\d{6})\.tar$")
_PNG_COMPRESS_LEVEL = 6
_SHA_META_KEY = "sha256"

#: Called after each shard is in place with (shard, uploaded); ``uploaded`` is False when an
#: identical object was already there. Raising from it aborts the ingest (used to test interruption).
ShardHook = Callable[[ShardInfo, bool], None]


def shard_name(split: str, index: int) -> str:
    """``train-000003.tar`` for split ``train`` and index 3."""
    validate_name(split, "split name")
    if not 0 <= index <= 999_999:
        raise ValueError(f"shard index {index} out of range 0..999999 (raise shard_size)")
    return f"{split}-{index:06d}.tar"


def encode_png(image: np.ndarray) -> bytes:
    """Deterministic PNG bytes for a uint8 ``(H, W, 1|3)`` image (no timestamps, fixed settings)."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    # Fixed metadata so the same samples always produce the same bytes (and sha256).
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | Path, images: np.ndarray, labels: np.ndarray, first_index: int) -> int:
    """Write one WebDataset shard; sample keys are the zero-padded indices within the split.

    Returns:
        The number of samples written.
    """
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, (image, label) in enumerate(zip(images, labels)):
            key = f"{first_index + offset:09d}"
            _tar_member(tar, f"{key}.png", encode_png(image))
            _tar_member(tar, f"{key}.cls", str(int(label)).encode("ascii"))
    return len(labels)


def _existing_sha(url: str, info: s3.ObjectInfo, expected_size: int) -> str | None:
    """sha256 of the object already at url: S3 metadata, or recomputed for a same-size local file."""
    if s3.is_s3_url(url):
        return info.metadata.get(_SHA_META_KEY)
    if info.size != expected_size:
        return None
    return s3.sha256_file(s3.local_path(url))


class _RateColumn(ProgressColumn):
    """Samples per second, which is what matters for ingest throughput."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} samples/s" if speed else "-- samples/s", style="progress.data.speed")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _withdraw_entry(catalog_url: str, name: str, endpoint_url: str | None) -> None:
    if delete_entry(catalog_url, name, endpoint_url=endpoint_url) is not None:
        log.info("withdrew catalog entry %s before overwriting its shards", name)


def ingest_dataset(
    ds: ArrayDataset,
    dest: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    catalog_url: str | None = None,
    progress: bool = True,
    *,
    endpoint_url: str | None = None,
    on_shard: ShardHook | None = None,
    lineage: dict[str, str] | None = None,
    compact: bool = True,
) -> CatalogEntry:
    """Write ds as tar shards under ``<dest>/<ds.name>/`` and record it in the catalog (last).

    Args:
        ds: the dataset.
        dest: data root, ``s3://bucket/prefix`` or a local directory.
        shard_size: samples per shard.
        catalog_url: where the catalog lives; default ``<dest>/catalog.json``.
        progress: show a progress bar with samples/s.
        endpoint_url: S3 endpoint (default from the environment).
        on_shard: hook called after each shard is in place (see :data:`ShardHook`).
        lineage: ``base``, ``recipe``, ``fingerprint`` of a derived dataset, stored in its entry.
        compact: rewrite the catalog index afterwards; a batch of ingests passes False and calls
            :func:`pipeline.data.catalog_store.compact` once at the end.

    Returns:
        The catalog entry, identical (``created_at`` included) when the same data was already ingested.

    Raises:
        ValueError: invalid name or shard_size.
        pipeline.data.s3.StorageError: storage unreachable, bucket missing, credentials rejected.
    """
    validate_name(ds.name)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    dest = s3.absolute_location(dest)  # shard URLs in the catalog must mean the same place on every node
    catalog_url = s3.absolute_location(catalog_url or catalog_url_for(dest))
    prefix = s3.join_url(dest, ds.name)
    previous = load_entry(catalog_url, ds.name, endpoint_url=endpoint_url)
    total = sum(len(y) for _, y in ds.splits.values())
    with tempfile.TemporaryDirectory(prefix="stamp-ingest-") as tmp, _progress(progress) as bar:
        uploader = _ShardUploader(Path(tmp), prefix, catalog_url, ds.name, endpoint_url, previous)
        task = bar.add_task(f"ingest {ds.name}", total=total)
        splits: dict[str, SplitInfo] = {}
        for split, (x, y) in ds.splits.items():
            shards: list[ShardInfo] = []
            for index, start in enumerate(range(0, len(y), shard_size)):
                shard, uploaded = uploader.put(shard_name(split, index), x[start : start + shard_size],
                                               y[start : start + shard_size], start)
                shards.append(shard)
                bar.advance(task, shard.samples)
                if on_shard is not None:
                    on_shard(shard, uploaded)
            splits[split] = SplitInfo(shards=tuple(shards), samples=sum(s.samples for s in shards))
    entry = _record_entry(catalog_url, _new_entry(ds, splits, lineage), endpoint_url)
    if compact:
        compact_catalog(catalog_url, endpoint_url=endpoint_url)
    _delete_stale(prefix, set(entry.shard_urls), endpoint_url)
    return entry


class _ShardUploader:
    """Writes shards in a local directory and puts them under the dataset prefix unless identical bytes are there.

    Withdraws the current catalog entry (once) before the first shard it references is overwritten.
    """

    def __init__(self, tmp: Path, prefix: str, catalog_url: str, name: str, endpoint_url: str | None,
                 previous: CatalogEntry | None) -> None:
        self.tmp, self.prefix, self.endpoint_url = tmp, prefix, endpoint_url
        self.catalog_url, self.name = catalog_url, name
        self.previous_urls = set(previous.shard_urls) if previous is not None else set()
        self.withdrawn = False

    def put(self, name: str, images: np.ndarray, labels: np.ndarray, first_index: int) -> tuple[ShardInfo, bool]:
        """The shard ``name`` in place, and whether it was uploaded (False: an identical object was there)."""
        url = s3.join_url(self.prefix, name)
        local = self.tmp / name
        count = write_shard(local, images, labels, first_index)
        sha = s3.sha256_file(local)
        size = local.stat().st_size
        info = s3.head(url, endpoint_url=self.endpoint_url)
        unchanged = info is not None and _existing_sha(url, info, size) == sha
        if not unchanged:
            if url in self.previous_urls and not self.withdrawn:
                _withdraw_entry(self.catalog_url, self.name, self.endpoint_url)
                self.withdrawn = True
            s3.upload_file(local, url, metadata={_SHA_META_KEY: sha}, endpoint_url=self.endpoint_url)
        local.unlink()
        return ShardInfo(url=url, sha256=sha, samples=count), not unchanged


def _new_entry(ds: ArrayDataset, splits: dict[str, SplitInfo], lineage: dict[str, str] | None) -> CatalogEntry:
    """The catalog entry of ``ds`` with these shards, created now."""
    return CatalogEntry(
        name=ds.name,
        num_classes=ds.num_classes,
        class_names=tuple(ds.class_names),
        image_shape=ds.image_shape,
        splits=splits,
        created_at=utc_now(),
        source=ds.source,
        **(lineage or {}),
    )


def _record_entry(catalog_url: str, entry: CatalogEntry, endpoint_url: str | None) -> CatalogEntry:
    """Write ``entry`` to the catalog, keeping the current ``created_at`` (and not writing) when the content is the same."""
    current = load_entry(catalog_url, entry.name, endpoint_url=endpoint_url)
    if current is not None and current.same_content(entry):
        entry = replace(entry, created_at=current.created_at)
    if current is None or current != entry:
        put_entry(catalog_url, entry, endpoint_url=endpoint_url)
    return entry


def _delete_stale(prefix: str, keep: set[str], endpoint_url: str | None) -> list[str]:
    """Delete shard-named objects (and our temp leftovers) under the dataset prefix that the entry does not list."""
    removed = []
    for url in s3.list_urls(prefix, endpoint_url=endpoint_url):
        base = url.rsplit("/", 1)[-1]
        is_shard = SHARD_NAME_RE.match(base) is not None
        is_leftover = base.startswith(".") and base.endswith(".tmp")
        if (is_shard or is_leftover) and url not in keep:
            s3.delete(url, endpoint_url=endpoint_url)
            removed.append(url)
    if removed:
        log.info("deleted %d stale shard(s) under %s", len(removed), prefix)
    return removed


def ingest_source(
    spec: str,
    dest: str,
    name: str | None = None,
    **kwargs: Any,
) -> CatalogEntry:
    """Load a dataset from a spec (see :func:`pipeline.data.sources.load_source`) and ingest it."""
    return ingest_dataset(load_source(spec, name=name), dest, **kwargs)


def remove_dataset(
    name: str,
    catalog_url: str,
    delete_shards: bool = True,
    *,
    endpoint_url: str | None = None,
) -> CatalogEntry:
    """Remove a dataset from the catalog (first), then delete its shards.

    Raises:
        KeyError: the dataset is not in the catalog (the message lists the known ones).
    """
    validate_name(name)
    entry = delete_entry(catalog_url, name, endpoint_url=endpoint_url)
    if entry is None:
        Catalog.load(catalog_url, endpoint_url=endpoint_url).get(name)  # raises the KeyError listing the known ones
    assert entry is not None
    compact_catalog(catalog_url, endpoint_url=endpoint_url)
    if delete_shards:
        for url in entry.shard_urls:
            s3.delete(url, endpoint_url=endpoint_url)
    return entry
