"""Streaming throughput: decoded + resized images/s on one core, S3 (SeaweedFS) versus local disk.

The same WebDataset shards are read once from a local directory and once from S3 through
``pipeline.data.iter_samples`` (tar parsing, PNG decode, label checks), and every batch of
256 goes through ``stamp_core.preprocess.prepare_images`` to 32x32. ``torch.set_num_threads(1)``;
the S3 server runs in its own process. Each figure is the median of ``--runs`` full passes.
A second table measures the episode sampler (episodes/s and images/s it hands to training).

Usage:
    python tests/benchmarks/bench_streaming.py [--samples 20000] [--runs 3] [--shard-size 5000]

S3: by default a private SeaweedFS is started (pipeline.stack.SeaweedFS) on free loopback ports
with random keys and stopped at the end; with ``--endpoint URL --bucket NAME`` an existing server
is used with credentials from the standard AWS environment. Data: the first ``--samples`` images
of ../shared/datasets/mnist.npz when present, else the procedural ``stripes`` set (both 28x28
grayscale).

Targets: >= 2000 img/s from S3, and S3 within 80% of local disk.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.data import ArrayDataset, EpisodeSampler, build_procedural, ingest_dataset, iter_samples, load_npz, s3  # noqa: E402
from stamp_core.preprocess import prepare_images  # noqa: E402

BATCH = 256
IMAGE_SIZE = 32
TARGET_IMG_S = 2000.0
TARGET_RATIO = 0.8


def _dataset(samples: int) -> ArrayDataset:
    mnist = REPO_ROOT.parent / "shared" / "datasets" / "mnist.npz"
    if mnist.is_file():
        full = load_npz(mnist)
        return ArrayDataset(
            "mnist",
            full.x_train[:samples],
            full.y_train[:samples],
            full.x_test[:0],
            full.y_test[:0],
            full.class_names,
            source=full.source,
        )
    per_class = max(1, samples // 8)
    ds = build_procedural("stripes", n_per_class=per_class, n_test_per_class=0)
    return ds


def _stream_pass(catalog_url: str, name: str) -> tuple[int, float]:
    """One full pass: decode every sample and resize it in batches. Returns (images, seconds)."""
    start = time.perf_counter()
    batch: list[np.ndarray] = []
    count = 0
    for sample in iter_samples(catalog_url, name, "train"):
        batch.append(sample.image)
        if len(batch) == BATCH:
            count += prepare_images(np.stack(batch), IMAGE_SIZE).shape[0]
            batch = []
    if batch:
        count += prepare_images(np.stack(batch), IMAGE_SIZE).shape[0]
    return count, time.perf_counter() - start


def _episode_pass(catalog_url: str, steps: int) -> tuple[int, float]:
    """Episodes of the default shape (20/class support, 64 query); returns (images handed out, s)."""
    sampler = EpisodeSampler(catalog_url, image_size=IMAGE_SIZE, steps_per_epoch=steps, seed=0)
    start = time.perf_counter()
    images = sum(e.support_x.shape[0] + e.query_x.shape[0] for e in sampler)
    return images, time.perf_counter() - start


def _median(fn: Callable[[], tuple[int, float]], runs: int) -> tuple[int, float, list[float]]:
    results = [fn() for _ in range(runs)]
    seconds = [r[1] for r in results]
    return results[0][0], statistics.median(seconds), seconds


@contextmanager
def _s3_root(endpoint: str | None, bucket: str | None, workdir: Path) -> Iterator[str]:
    if endpoint:
        if not bucket:
            raise SystemExit("--endpoint needs --bucket")
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        s3.create_bucket(bucket, endpoint_url=endpoint)
        yield f"s3://{bucket}/bench-{secrets.token_hex(4)}"
        return
    from pipeline.stack import S3Credentials, SeaweedFS, SeaweedPorts, procs

    creds = S3Credentials.generate()
    server = SeaweedFS(
        data_dir=workdir / "weed",
        log_path=workdir / "weed.log",
        ports=SeaweedPorts.from_s3_port(procs.free_port_block(SeaweedPorts.offsets())),
        credentials=creds,
    )
    server.start(timeout=60)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")}
    try:
        os.environ.update(creds.env())
        os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint_url
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            os.environ.pop(name, None)
        server.ensure_bucket("bench")
        yield "s3://bench/data"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--episodes", type=int, default=30, help="episodes per sampler run (0 skips)")
    parser.add_argument("--endpoint", default=None, help="existing S3 endpoint (default: start SeaweedFS)")
    parser.add_argument("--bucket", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    ds = _dataset(args.samples)
    print(
        f"data: {ds.name} {len(ds.y_train)} images {ds.image_shape}, shards of {args.shard_size}, "
        f"resize to {IMAGE_SIZE}x{IMAGE_SIZE}, torch threads={torch.get_num_threads()}, "
        f"median of {args.runs}"
    )
    with tempfile.TemporaryDirectory(prefix="stamp-bench-") as tmp:
        workdir = Path(tmp)
        local_root = str(workdir / "local")
        ingest_dataset(ds, local_root, shard_size=args.shard_size, progress=False)
        rows: list[tuple[str, int, float, list[float]]] = []
        episode_rows: list[tuple[str, int, float, list[float]]] = []
        local_catalog = f"{local_root}/catalog.json"
        _stream_pass(local_catalog, ds.name)  # warm the page cache and imports
        n, med, runs = _median(lambda: _stream_pass(local_catalog, ds.name), args.runs)
        rows.append(("local disk", n, med, runs))
        if args.episodes:
            episode_rows.append(
                ("local disk", *_median(lambda: _episode_pass(local_catalog, args.episodes), args.runs))
            )
        with _s3_root(args.endpoint, args.bucket, workdir) as s3_root:
            ingest_dataset(ds, s3_root, shard_size=args.shard_size, progress=False)
            s3_catalog = f"{s3_root}/catalog.json"
            _stream_pass(s3_catalog, ds.name)
            n, med, runs = _median(lambda: _stream_pass(s3_catalog, ds.name), args.runs)
            rows.append(("S3 (SeaweedFS)" if not args.endpoint else f"S3 {args.endpoint}", n, med, runs))
            if args.episodes:
                episode_rows.append(("S3", *_median(lambda: _episode_pass(s3_catalog, args.episodes), args.runs)))

    print()
    print(f"{'source':<22}{'images':>8}{'median s':>10}{'img/s':>10}   runs (s)")
    for label, n, med, runs in rows:
        print(f"{label:<22}{n:>8}{med:>10.3f}{n / med:>10.0f}   {', '.join(f'{r:.3f}' for r in runs)}")
    local_rate = rows[0][1] / rows[0][2]
    s3_rate = rows[1][1] / rows[1][2]
    ratio = s3_rate / local_rate
    print(
        f"S3 / local = {ratio:.2f}   (targets: S3 >= {TARGET_IMG_S:.0f} img/s: "
        f"{'PASS' if s3_rate >= TARGET_IMG_S else 'FAIL'}; ratio >= {TARGET_RATIO}: "
        f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'})"
    )
    if episode_rows:
        print()
        print(f"{'episode sampler':<22}{'episodes':>9}{'median s':>10}{'ep/s':>8}{'img/s out':>11}")
        for label, images, med, _ in episode_rows:
            print(f"{label:<22}{args.episodes:>9}{med:>10.3f}{args.episodes / med:>8.1f}{images / med:>11.0f}")
    return 0 if s3_rate >= TARGET_IMG_S and ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
