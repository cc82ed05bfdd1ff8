"""Where a per-worker training loop runs: Ray Train or one plain process, behind :class:`WorkerContext`.

Both jobs are a *per-worker loop* (plain PyTorch, no Ray imports) driven through a small
:class:`WorkerContext` (rank, world size, device, checkpoint in/out, report). Under Ray the
context wraps ``ray.train``; in tests and benchmarks :class:`LocalContext` runs the same loop in one
process, so the loop is tested without a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.data import CHECKPOINT_PREFIX

log = logging.getLogger(__name__)


class WorkerContext(Protocol):
    """What a per-worker loop needs from its runtime (Ray Train or a plain process)."""

    rank: int
    world_size: int
    device: torch.device

    def checkpoint_dir(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest checkpoint to resume from, as a local directory (None on a fresh start)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        """Report metrics (every rank, equally often) and optionally a checkpoint directory."""
        ...


class LocalContext:
    """A single-process context: checkpoints are copied to ``root/<name>``, reports are kept in memory."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        return found[-1] if found else None

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        yield self.latest_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        record = dict(metrics)
        if checkpoint_dir is not None:
            dest = self.root / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(checkpoint_dir, dest)
            record["checkpoint"] = str(dest)
        self.reports.append(record)


class RayContext:
    """``ray.train`` behind the WorkerContext interface (built inside a Ray Train worker)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        import ray.train

        import pyarrow.fs

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            yield Path(checkpoint.path)
            return
        # Each rank downloads into a private directory. Checkpoint.as_directory() shares one
        # download per node and deletes it when the first reader leaves, which corrupted the
        # other rank's reads of optimizer.pt in testing.
        with tempfile.TemporaryDirectory(prefix="stamp-restore-") as tmp:
            yield Path(checkpoint.to_directory(tmp))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


@dataclass
class WorkerSetup:
    """Values the driver resolves once (settings, catalog) and hands to every worker; no secrets."""

    catalog_url: str
    s3_endpoint: str | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def set_threads(cpus: float, device: torch.device) -> None:
    """One intra-op thread per reserved CPU: more threads than CPUs oversubscribe co-located workers."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def emit(ctx: WorkerContext, message: str) -> None:
    """Progress lines: Ray Train workers log them (Train patches print() into a duplicating tee)."""
    if isinstance(ctx, RayContext):
        log.info(message)
    else:
        print(message, flush=True)
