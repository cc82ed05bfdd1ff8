"""Streaming reads of catalogued shards: one split of one dataset as a stream of :class:`Sample`.

:class:`SampleStream` reads one split of one dataset as a WebDataset pipeline: an explicit shard
assignment (shard ``i`` goes to global worker ``i % (world_size * num_workers)``), tar parsing with
webdataset's iterators over ``webdataset.gopen`` (``s3://`` through the boto3 opener registered by
:mod:`pipeline.data.s3`), and a decode stage. Corrupt or missing shards, undecodable images,
samples without ``cls`` and out-of-range labels are skipped and counted in ``stats``; when the
unusable share passes ``max_bad_fraction`` it raises :class:`DataQualityError` naming the bad shards.

:func:`iter_samples` and :func:`load_split_arrays` read a split back in shard order (round trips,
pretraining, validation tasks); :mod:`pipeline.data.episodes` turns resampled streams into episodes.

When there are fewer shards than global workers, every worker reads every shard but keeps only
the samples at positions ``p`` with ``p % G == g`` (sample-level striding): no overlap, at the cost
of each worker parsing all the tar bytes.

A training reader (:meth:`SampleStream.open_samples` on a resampled stream) can be closed at any
point, which closes its S3 connection, and reopened later: it continues at the next sample of the
shard it was in with one ranged GET (``Range: bytes=offset-`` from the tar header offset), so
closing never re-reads bytes nor favours the start of a shard. The episode sampler relies on this
to keep only a few connections open per worker while drawing from many datasets. A
:class:`ConnectionGauge` counts the shard bodies open at once.
"""


from __future__ import annotations

import hashlib
import io
import logging
import random
import tarfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import botocore.exceptions as bexc
import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from pipeline.data import s3
from pipeline.data.catalog import Catalog, CatalogEntry

log = logging.getLogger(__name__)

STAT_KEYS = (
    "samples_ok",
    "skipped_corrupt_shard",
    "skipped_bad_image",
    "skipped_missing_cls",
    "skipped_bad_label",
)
_IMAGE_EXTS = ("png", "jpg", "jpeg")
_WARN_PER_SHARD = 3


class DataQualityError(RuntimeError):
    """Too much of a dataset is unusable (corrupt shards or bad samples); the message names the shards."""


class Sample(NamedTuple):
    """A decoded sample: uint8 ``(H, W, C)`` pixels, label, and a key unique within its split."""

    image: np.ndarray
    label: int
    key: str


@dataclass(frozen=True)
class ShardAssignment:
    """Which shards a global worker reads, and which sample positions in them it keeps."""

    shards: tuple[int, ...]
    stride: int
    offset: int

    def keeps(self, position: int) -> bool:
        return position % self.stride == self.offset

    def expected(self, samples_in_shard: int) -> int:
        """How many samples of a shard of that size this worker keeps."""
        return len(range(self.offset, samples_in_shard, self.stride))


def assign_shards(
    num_shards: int, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1
) -> ShardAssignment:
    """Deterministic, non-overlapping split of shards over ``world_size * num_workers`` global workers.

    Shard ``i`` goes to global worker ``i % G`` (``g = rank * num_workers + worker_id``). With
    fewer shards than workers every worker gets every shard and keeps sample positions ``p % G == g``.
    """
    if world_size < 1 or num_workers < 1:
        raise ValueError(f"world_size ({world_size}) and num_workers ({num_workers}) must be >= 1")
    if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
        raise ValueError(
            f"rank {rank} / worker {worker_id} out of range for world_size {world_size} / num_workers {num_workers}"
        )
    total = world_size * num_workers
    gid = rank * num_workers + worker_id
    if num_shards >= total:
        return ShardAssignment(tuple(i for i in range(num_shards) if i % total == gid), 1, 0)
    return ShardAssignment(tuple(range(num_shards)), total, gid)


def dataloader_worker() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the calling DataLoader worker; ``(0, 1)`` outside one."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def new_stats() -> dict[str, float]:
    """Zeroed counters: the :data:`STAT_KEYS`, ``shards_read`` (shards started) and ``gets`` (GET
    requests: shards started plus ranged GETs that continued a shard after a close)."""
    stats: dict[str, float] = {k: 0 for k in STAT_KEYS}
    stats["shards_read"] = 0
    stats["gets"] = 0
    return stats


class ConnectionGauge:
    """How many shard bodies (S3 GET responses, each holding one HTTP connection) are open now, and the peak.

    Shared by the streams of one reader process so the count is per worker, not per dataset.
    """

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def opened(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def closed(self) -> None:
        self.now -= 1


@dataclass
class _Cursor:
    """Where a closed resampled reader stopped: the next sample of shard ``index`` starts at byte
    ``offset`` and is sample ``position`` of the shard; ``seen`` of the shard's samples were kept."""

    index: int
    offset: int
    position: int
    seen: int


@dataclass
class _Resume:
    """Per-worker state that outlives one reader: the shard-draw rng and the cursor."""

    rng: random.Random
    cursor: _Cursor | None = None


def _tar_samples(stream: Any, base_offset: int) -> Iterator[tuple[dict[str, Any], int | None]]:
    """Samples of a tar stream (members grouped by key, as webdataset does), each with the byte offset
    (from the start of the object) of the next sample's first header, or None after the last one.

    Members named ``__...__`` (webdataset metadata) and non-files are skipped.
    """
    tar = tarfile.open(fileobj=stream, mode="r|")
    current: dict[str, Any] | None = None
    for info in tar:
        if not info.isreg() or info.name.startswith("__"):
            continue
        key, ext = base_plus_ext(info.name)
        if key is None or ext is None:
            continue
        if current is not None and current["__key__"] != key:
            # info.offset counts from where this reader started, headers of long names included.
            yield current, base_offset + info.offset
            current = None
        if current is None:
            current = {"__key__": key}
        ext = ext.lower()
        if ext in current:
            raise ValueError(f"duplicate member {info.name} in one sample")
        member = tar.extractfile(info)
        current[ext] = member.read() if member is not None else b""
        tar.members = []  # a stream can be long: keep no member list
    if current is not None:
        yield current, None


class SampleStream(IterableDataset):
    """One split of one catalogued dataset as a stream of :class:`Sample`, split across ranks/workers.

    Args:
        entry: the dataset's catalog entry.
        split: which split to read.
        resampled: False reads each assigned shard once, in order; True draws assigned shards at
            random with replacement forever (training streams).
        rank, world_size: this process's place in the job.
        seed: seed for shard resampling.
        verify_sha256: download each shard whole and check its sha256 against the catalog first.
        max_bad_fraction: raise DataQualityError when unusable samples (bad samples plus the
            samples of shards that could not be read) exceed this share of everything seen.
        min_samples_for_check: the share is only judged after this many samples (and always at
            the end of a one-pass read).
        endpoint_url: S3 endpoint for ``s3://`` shards (default from the environment).
        gauge: counts this stream's open shard bodies (pass one gauge to several streams to count
            a worker's connections); default a private one.
    """

    def __init__(
        self,
        entry: CatalogEntry,
        split: str = "train",
        *,
        resampled: bool = False,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        verify_sha256: bool = False,
        max_bad_fraction: float = 0.1,
        min_samples_for_check: int = 200,
        endpoint_url: str | None = None,
        gauge: ConnectionGauge | None = None,
    ) -> None:
        super().__init__()
        self.entry = entry
        self.split = split
        self.info = entry.split(split)
        if not self.info.shards:
            raise ValueError(f"dataset {entry.name!r} split {split!r} has no shards")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.resampled = resampled
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.verify_sha256 = verify_sha256
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_check = min_samples_for_check
        self.endpoint_url = endpoint_url
        self.gauge = gauge or ConnectionGauge()
        self.stats = new_stats()
        #: shard URL -> reasons it was (partly) unusable, for error messages.
        self.bad_shards: dict[str, list[str]] = {}
        self._lost = 0  # samples that corrupt shards should have provided
        self._resume: dict[tuple[int, int], _Resume] = {}
        assign_shards(len(self.info.shards), rank, world_size)  # validates rank/world_size early

    # ----------------------------------------------------------------------------- pipeline

    def pipeline(self, worker_id: int | None = None, num_workers: int | None = None) -> wds.DataPipeline:
        """The webdataset pipeline for one worker (default: the current DataLoader worker)."""
        if worker_id is None or num_workers is None:
            worker_id, num_workers = dataloader_worker()
        assignment = assign_shards(len(self.info.shards), self.rank, self.world_size, worker_id, num_workers)
        resume = self._resume_state(worker_id, num_workers)
        return wds.DataPipeline(
            lambda: self._shard_source(assignment, resume),
            lambda src: self._read_shards(src, assignment, resume),
            self._decode,
        )

    def open_samples(self, worker_id: int = 0, num_workers: int = 1) -> Generator[Sample, None, None]:
        """A reader for one worker whose ``close()`` closes its S3 connection at once.

        On a resampled stream a new reader continues where the last closed one of the same worker
        stopped (same shard draws, next sample, one ranged GET), so a sequence of readers yields
        exactly the samples one long-lived reader would.
        """
        assignment = assign_shards(len(self.info.shards), self.rank, self.world_size, worker_id, num_workers)
        resume = self._resume_state(worker_id, num_workers)
        raw = self._read_shards(self._shard_source(assignment, resume), assignment, resume)
        try:
            yield from self._decode(raw)
        finally:
            raw.close()  # explicit: do not leave the open body to the garbage collector

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.pipeline())

    def _resume_state(self, worker_id: int, num_workers: int) -> _Resume:
        key = (worker_id, num_workers)
        if key not in self._resume:
            rng = random.Random(f"{self.seed}:{self.rank}:{worker_id}:{self.entry.name}:{self.split}")
            self._resume[key] = _Resume(rng)
        return self._resume[key]

    def _shard_source(self, assignment: ShardAssignment, resume: _Resume) -> Iterator[dict[str, Any]]:
        shards = self.info.shards
        if not self.resampled:
            for i in assignment.shards:
                yield {"url": shards[i].url, "index": i, "cursor": None}
            return
        cursor, resume.cursor = resume.cursor, None
        if cursor is not None:
            yield {"url": shards[cursor.index].url, "index": cursor.index, "cursor": cursor}
        while True:
            i = resume.rng.choice(assignment.shards)
            yield {"url": shards[i].url, "index": i, "cursor": None}

    def _open(self, url: str, index: int, start: int) -> io.BufferedIOBase | Any:
        if not self.verify_sha256:
            return s3.open_stream(url, endpoint_url=self.endpoint_url, start=start)
        data = s3.get_bytes(url, endpoint_url=self.endpoint_url)
        digest = hashlib.sha256(data).hexdigest()
        expected = self.info.shards[index].sha256
        if digest != expected:
            raise _ShardMismatch(f"sha256 {digest[:12]}... != catalog {expected[:12]}...")
        body = io.BytesIO(data)
        body.seek(start)
        return body

    def _read_shards(
        self, src: Iterable[dict[str, Any]], assignment: ShardAssignment, resume: _Resume
    ) -> Iterator[dict[str, Any]]:
        for shard in src:
            url, index, cursor = shard["url"], shard["index"], shard["cursor"]
            expected = assignment.expected(self.info.shards[index].samples)
            if cursor is None:
                self.stats["shards_read"] += 1
                cursor = _Cursor(index, 0, 0, 0)
            seen, position = cursor.seen, cursor.position
            self.stats["gets"] += 1
            try:
                with self._open(url, index, cursor.offset) as stream:
                    self.gauge.opened()
                    try:
                        for raw, next_offset in _tar_samples(stream, cursor.offset):
                            keep = assignment.keeps(position)
                            position += 1
                            seen += int(keep)
                            if self.resampled:
                                # Saved before the yield: a reader closed there resumes after this sample.
                                resume.cursor = (None if next_offset is None
                                                 else _Cursor(index, next_offset, position, seen))
                            if keep:
                                raw["__url__"] = url
                                raw["__shard__"] = index
                                yield raw
                    finally:
                        self.gauge.closed()
                resume.cursor = None
                if seen != expected:
                    raise _ShardMismatch(f"holds {seen} samples for this reader, catalog implies {expected}")
            except s3.ObjectNotFoundError as exc:
                resume.cursor = None
                self._corrupt_shard(url, f"missing ({exc})", expected - seen)
            except s3.StorageError:
                raise  # endpoint, bucket or credentials: not a data problem, do not hide it
            except (
                _ShardMismatch,
                tarfile.TarError,
                OSError,
                EOFError,
                ValueError,
                KeyError,
                # A connection dropped mid-body: skip the shard; a resampled stream comes back to it.
                bexc.BotoCoreError,
            ) as exc:
                resume.cursor = None
                # Our own mismatch message is complete; a library error needs its type to be understood.
                reason = str(exc) if isinstance(exc, _ShardMismatch) else f"{type(exc).__name__}: {exc}"
                self._corrupt_shard(url, reason, expected - seen)

    def _corrupt_shard(self, url: str, reason: str, lost: int) -> None:
        self.stats["skipped_corrupt_shard"] += 1
        self._lost += max(1, lost)
        self.bad_shards.setdefault(url, []).append(f"unreadable: {reason}")
        log.warning("skipping corrupt shard %s: %s", url, reason)
        self._check_quality()

    def _bad_sample(self, kind: str, raw: dict[str, Any], reason: str) -> None:
        self.stats[kind] += 1
        url = raw.get("__url__", "?")
        reasons = self.bad_shards.setdefault(url, [])
        reasons.append(f"sample {raw.get('__key__')}: {reason}")
        if len(reasons) <= _WARN_PER_SHARD:
            log.warning("skipping sample %s in %s: %s", raw.get("__key__"), url, reason)
        self._check_quality()

    def _decode(self, src: Iterable[dict[str, Any]]) -> Iterator[Sample]:
        h, w, c = self.entry.image_shape
        num_classes = self.entry.num_classes
        mode = "L" if c == 1 else "RGB"
        for raw in src:
            cls_bytes = raw.get("cls")
            if cls_bytes is None:
                self._bad_sample("skipped_missing_cls", raw, "no .cls member")
                continue
            try:
                label = int(cls_bytes.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                self._bad_sample("skipped_bad_label", raw, f"label {cls_bytes[:16]!r} is not an integer")
                continue
            if not 0 <= label < num_classes:
                self._bad_sample("skipped_bad_label", raw, f"label {label} outside 0..{num_classes - 1}")
                continue
            data = next((raw[e] for e in _IMAGE_EXTS if e in raw), None)
            if data is None:
                self._bad_sample("skipped_bad_image", raw, "no .png/.jpg member")
                continue
            try:
                with Image.open(io.BytesIO(data)) as img:
                    arr = np.asarray(img if img.mode == mode else img.convert(mode), dtype=np.uint8)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
                self._bad_sample("skipped_bad_image", raw, f"undecodable ({type(exc).__name__})")
                continue
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.shape != (h, w, c):
                self._bad_sample("skipped_bad_image", raw, f"shape {arr.shape} != catalog {(h, w, c)}")
                continue
            self.stats["samples_ok"] += 1
            yield Sample(arr, label, f"{raw['__shard__']}/{raw['__key__']}")
        self._check_quality(final=not self.resampled)

    # ------------------------------------------------------------------------------ quality

    @property
    def bad_count(self) -> int:
        """Unusable samples so far: bad samples plus those expected from unreadable shards."""
        return int(sum(self.stats[k] for k in STAT_KEYS[2:]) + self._lost)

    def _check_quality(self, final: bool = False) -> None:
        bad = self.bad_count
        total = bad + int(self.stats["samples_ok"])
        if total == 0:
            if final and self.stats["shards_read"]:
                raise DataQualityError(self._quality_message(0, 0))
            return
        if (final or total >= self.min_samples_for_check) and bad / total > self.max_bad_fraction:
            raise DataQualityError(self._quality_message(bad, total))

    def _quality_message(self, bad: int, total: int) -> str:
        shards = "; ".join(
            f"{url} ({reasons[0]}{f' and {len(reasons) - 1} more' if len(reasons) > 1 else ''})"
            for url, reasons in sorted(self.bad_shards.items())
        )
        share = f"{bad} of {total} samples" if total else "every sample"
        return (
            f"dataset {self.entry.name!r} split {self.split!r}: {share} unusable, more than "
            f"max_bad_fraction={self.max_bad_fraction:g}; bad shards: {shards or 'none'}. "
            "Re-ingest the dataset (`stamp ingest`) or raise max_bad_fraction"
        )


class _ShardMismatch(Exception):
    """A shard's bytes disagree with the catalog (hash or sample count)."""


# -------------------------------------------------------------------------------- read back


def _entry(catalog_url: str, dataset: str, endpoint_url: str | None) -> CatalogEntry:
    catalog = Catalog.load(catalog_url, missing_ok=False, endpoint_url=endpoint_url)
    return catalog.get(dataset)


def iter_samples(
    catalog_url: str,
    dataset: str,
    split: str = "train",
    *,
    rank: int = 0,
    world_size: int = 1,
    verify_sha256: bool = False,
    max_bad_fraction: float = 0.1,
    endpoint_url: str | None = None,
) -> SampleStream:
    """One pass over a split in shard order, as an iterable of :class:`Sample` (with ``.stats``)."""
    return SampleStream(
        _entry(catalog_url, dataset, endpoint_url),
        split,
        resampled=False,
        rank=rank,
        world_size=world_size,
        verify_sha256=verify_sha256,
        max_bad_fraction=max_bad_fraction,
        endpoint_url=endpoint_url,
    )


def load_split_arrays(
    catalog_url: str,
    dataset: str,
    split: str = "train",
    *,
    verify_sha256: bool = False,
    endpoint_url: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as ``(x uint8 (N, H, W, C), y int64 (N,))`` in ingest order."""
    stream = iter_samples(catalog_url, dataset, split, verify_sha256=verify_sha256, endpoint_url=endpoint_url)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for sample in stream:
        images.append(sample.image)
        labels.append(sample.label)
    h, w, c = stream.entry.image_shape
    x = np.stack(images) if images else np.zeros((0, h, w, c), np.uint8)
    return x, np.asarray(labels, dtype=np.int64)
