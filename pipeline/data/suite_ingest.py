"""Ingest a whole source suite: N datasets built and uploaded in parallel, idempotently, with one
progress bar and a summary.

* Idempotent by fingerprint: a dataset whose catalog entry carries the same fingerprint (recipe, base
  content, code versions, shard size; :meth:`pipeline.data.suites.DatasetSpec.fingerprint`) is not
  built again, so a second run reads the catalog and uploads nothing. A changed recipe rebuilds that
  dataset only, and :func:`pipeline.data.ingest.ingest_dataset` still skips every shard whose bytes
  are already there.
* Parallel in processes (``jobs`` > 1): building and PNG-encoding are CPU-bound numpy/zlib work that
  threads would serialise. Workers are spawned, not forked, so no thread or S3 client of the parent
  crosses into them (a script calling :func:`ingest_suite` with jobs > 1 therefore needs the usual
  ``if __name__ == "__main__":`` guard).
* Each dataset writes only its own catalog entry object; the index is rewritten once at the end
  (:func:`pipeline.data.catalog_store.compact`), also when some datasets failed.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.data import s3
from pipeline.data.catalog import Catalog, catalog_url_for
from pipeline.data.catalog_store import compact
from pipeline.data.ingest import DEFAULT_SHARD_SIZE, ingest_dataset
from pipeline.data.suites import DatasetSpec, Suite, build_dataset, check_held_out


class SuiteIngestError(RuntimeError):
    """Some datasets of a suite could not be ingested (the others were, and are in the catalog)."""


@dataclass
class SuiteReport:
    """What one suite ingest did."""

    suite: str
    datasets: int = 0  #: in the suite
    built: list[str] = field(default_factory=list)  #: built and ingested by this run
    skipped: list[str] = field(default_factory=list)  #: already in the catalog with the same fingerprint
    samples: int = 0  #: images written by this run (train + test)
    shards: int = 0  #: shards of the built datasets
    uploaded_shards: int = 0  #: of those, shards actually uploaded (others were already there)
    bytes: int = 0  #: bytes of the uploaded shards
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"suite {self.suite}: {self.datasets} datasets ({len(self.built)} ingested, {len(self.skipped)} already there"
            + (f", {len(self.failed)} failed" if self.failed else "")
            + f"), {self.samples:,} samples, {self.shards} shards ({self.uploaded_shards} uploaded), "
            f"{self.bytes / 1e6:,.1f} MB, {self.seconds:.1f} s ({self.images_per_second:,.0f} images/s)"
        )


def _ingest_one(spec: DatasetSpec, dest: str, catalog_url: str, shard_size: int, endpoint_url: str | None) -> dict[str, Any]:
    """Build and ingest one dataset (runs in a worker process); returns its counts."""
    ds = build_dataset(spec)
    uploaded: list[str] = []
    entry = ingest_dataset(
        ds, dest, shard_size=shard_size, catalog_url=catalog_url, progress=False, endpoint_url=endpoint_url,
        on_shard=lambda shard, up: uploaded.append(shard.url) if up else None,
        lineage=spec.lineage(shard_size), compact=False,
    )
    sizes = [info.size for url in uploaded if (info := s3.head(url, endpoint_url=endpoint_url)) is not None]
    return {
        "name": entry.name,
        "samples": sum(s.samples for s in entry.splits.values()),
        "shards": sum(len(s.shards) for s in entry.splits.values()),
        "uploaded_shards": len(uploaded),
        "bytes": sum(sizes),
    }


def ingest_suite(
    suite: Suite,
    dest: str,
    *,
    jobs: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    catalog_url: str | None = None,
    progress: bool = True,
    endpoint_url: str | None = None,
) -> SuiteReport:
    """Ingest every dataset of a validated suite (see :func:`pipeline.data.suites.load_suite`).

    Args:
        suite: the suite.
        dest: data root, ``s3://bucket/prefix`` or a local directory.
        jobs: worker processes; 1 builds and uploads in this process.
        shard_size: samples per shard.
        catalog_url: default ``<dest>/catalog.json``.
        progress: one progress bar for the suite (datasets done, images/s).
        endpoint_url: S3 endpoint (default from the environment).

    Raises:
        HeldOutTargetError: the suite holds a benchmark target (checked again: nothing is written).
        SuiteIngestError: some datasets failed; the others are ingested and in the catalog.
        ValueError: jobs or shard_size < 1.
    """
    if jobs < 1 or shard_size < 1:
        raise ValueError(f"jobs and shard_size must be >= 1, got jobs={jobs}, shard_size={shard_size}")
    check_held_out(suite)
    start = time.perf_counter()
    dest = s3.absolute_location(dest)
    catalog_url = s3.absolute_location(catalog_url or catalog_url_for(dest))
    catalog = Catalog.load(catalog_url, endpoint_url=endpoint_url)
    report = SuiteReport(suite=suite.name, datasets=len(suite.datasets))
    todo = []
    for spec in suite.datasets:
        entry = catalog.datasets.get(spec.name)
        if entry is not None and entry.fingerprint == spec.fingerprint(shard_size):
            report.skipped.append(spec.name)
        else:
            todo.append(spec)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task(f"suite {suite.name}", total=len(suite.datasets), completed=len(report.skipped), rate="")

        def done(name: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
            if error is not None:
                report.failed[name] = f"{type(error).__name__}: {error}"
            elif result is not None:
                report.built.append(name)
                for key in ("samples", "shards", "uploaded_shards", "bytes"):
                    setattr(report, key, getattr(report, key) + result[key])
            elapsed = time.perf_counter() - start
            bar.update(task, advance=1, rate=f"{report.samples / max(elapsed, 1e-9):,.0f} images/s")

        try:
            _run(todo, jobs, done, dest, catalog_url, shard_size, endpoint_url)
        finally:
            if report.built or todo:
                compact(catalog_url, endpoint_url=endpoint_url)
    report.seconds = time.perf_counter() - start
    if report.failed:
        lines = "; ".join(f"{n}: {e}" for n, e in sorted(report.failed.items()))
        raise SuiteIngestError(f"{len(report.failed)} of {report.datasets} datasets of suite {suite.name} failed ({lines}); "
                               f"the rest are in {catalog_url}; re-run to retry the failed ones")
    return report


def _run(todo: list[DatasetSpec], jobs: int, done: Any, dest: str, catalog_url: str, shard_size: int, endpoint_url: str | None) -> None:
    if jobs == 1 or len(todo) <= 1:
        for spec in todo:
            try:
                result = _ingest_one(spec, dest, catalog_url, shard_size, endpoint_url)
            except (ValueError, OSError, s3.StorageError) as exc:
                done(spec.name, None, exc)
            else:
                done(spec.name, result, None)
        return
    ctx = multiprocessing.get_context("spawn")
    # One BLAS/OpenMP thread per worker: the processes are the parallelism. Measured here (2 cores,
    # shared): with default BLAS threads 2 workers were 4x slower than 1 process (spinning threads).
    single = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k not in os.environ}
    os.environ.update(single)  # spawned workers read it at start; restored below
    try:
        _run_pool(ctx, todo, jobs, done, dest, catalog_url, shard_size, endpoint_url)
    finally:
        for key in single:
            os.environ.pop(key, None)


def _run_pool(ctx: Any, todo: list[DatasetSpec], jobs: int, done: Any, dest: str, catalog_url: str, shard_size: int,
              endpoint_url: str | None) -> None:
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        # At most 2 per worker queued: Ctrl-C then leaves little queued work to cancel.
        pending: dict[Future[dict[str, Any]], str] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < 2 * jobs:
                spec = queue.pop(0)
                pending[pool.submit(_ingest_one, spec, dest, catalog_url, shard_size, endpoint_url)] = spec.name
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = pending.pop(fut)
                exc = fut.exception()
                done(name, None if exc else fut.result(), exc)
