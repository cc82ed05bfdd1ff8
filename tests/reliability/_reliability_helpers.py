"""Shared pieces of the reliability suite: private servers we may kill, tiny pruners, payloads.

Not a test module (no ``test_`` prefix); the suite's files import it by name because pytest puts
their directory on ``sys.path``.
"""

from __future__ import annotations

import time

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from pipeline.data import ArrayDataset, build_procedural
from pipeline.stack import MlflowServer, S3Credentials, SeaweedFS, SeaweedPorts, procs
from stamp_core import StampPruner, TrainConfig, prepare_images, train_classifier

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Source directories whose frames may raise the errors users see; anything deeper is a library.
OUR_CODE = (str(REPO_ROOT / "stamp_core"), str(REPO_ROOT / "pipeline"))


def kill_service(service: SeaweedFS | MlflowServer) -> list[int]:
    """SIGKILL every process of a service we started (a crash, not a shutdown); returns the pids."""
    assert service.record is not None, "the service is not running"
    owned = procs.owned_processes(service.record)
    for proc in owned:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(owned, timeout=10)
    if service._popen is not None:  # reap our direct child
        service._popen.wait(timeout=10)
        service._popen = None
    service.record = None
    return [p.pid for p in owned]


@dataclass
class PrivateS3:
    """A SeaweedFS of one test: the test may kill it and start it again on the same data and ports."""

    make: Callable[[], SeaweedFS]
    server: SeaweedFS

    @property
    def endpoint(self) -> str:
        return self.server.endpoint_url

    def kill(self) -> list[int]:
        return kill_service(self.server)

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same data and ports; return once stored objects can be read again.

        SeaweedFS answers health checks before it has reloaded its volumes: reads right after a
        restart answered InternalError for a moment (seen once in CI). "The server is back" means
        the data is readable, so wait for one object of every bucket.
        """
        self.server = self.make()
        self.server.start(timeout=timeout)
        client = self.server.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                for bucket in client.list_buckets().get("Buckets", []):
                    listed = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", [])
                    if listed:
                        client.get_object(Bucket=bucket["Name"], Key=listed[0]["Key"])["Body"].read()
                return
            except Exception:  # noqa: BLE001 - not ready yet; the deadline bounds the wait
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@contextmanager
def private_seaweedfs(root: Path, monkeypatch: pytest.MonkeyPatch, max_attempts: int = 3) -> Iterator[PrivateS3]:
    """Start a private SeaweedFS and point the standard AWS variables at it (restored after)."""
    import boto3

    creds = S3Credentials.generate()
    ports = SeaweedPorts.from_s3_port(procs.free_port_block(SeaweedPorts.offsets()))

    def make() -> SeaweedFS:
        return SeaweedFS(data_dir=root / "data", log_path=root / "weed.log", ports=ports, credentials=creds)

    holder = PrivateS3(make=make, server=make())
    holder.server.start(timeout=60)
    try:
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "STAMP_S3_ENDPOINT", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds.access_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_access_key)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", holder.endpoint)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # Short retries keep the test fast; the production default is 5 attempts.
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(max_attempts))
        boto3.DEFAULT_SESSION = None
        yield holder
    finally:
        boto3.DEFAULT_SESSION = None
        holder.server.stop()


def tiny_pruner(dataset: ArrayDataset | None = None, seed: int = 0) -> StampPruner:
    """A small_cnn pruner (width 8) whose backbone saw two epochs, so BatchNorm statistics are real."""
    ds = dataset or build_procedural("stripes", n_per_class=16, n_test_per_class=4, seed=seed)
    torch.manual_seed(seed)
    pruner = StampPruner.create(
        "small_cnn", num_classes=ds.num_classes, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    )
    x = prepare_images(ds.x_train, 32)
    train_classifier(pruner.backbone, x, torch.from_numpy(ds.y_train), TrainConfig(epochs=2, lr=0.02, batch_size=32))
    return pruner.eval()


class MarkerPayload:
    """Unpickling this object creates ``marker``: proof that a loader executed untrusted bytes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def raised_from(exc: BaseException) -> str:
    """File of the innermost frame of an exception's own traceback (where it was raised)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return frames[-1].filename if frames else ""


def raised_by_our_code(exc: BaseException) -> bool:
    """True when the exception was raised by stamp_core/pipeline, i.e. it carries our message."""
    return raised_from(exc).startswith(OUR_CODE)


def grep_tree(root: Path, needles: list[str]) -> list[str]:
    """Files under root (recursively) whose bytes contain any needle: 'path: needle'."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n[:4]}..." for n in needles if n.encode() in data]
    return hits


def free_port() -> int:
    (port,) = procs.free_ports(1)
    return port
