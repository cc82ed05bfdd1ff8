#!/usr/bin/env python
"""Meta-training throughput: episodes/s in one process and under Ray Train with 1 and 2 workers.

What it measures, for one backbone at one episode shape (default: resnet18 at 32x32, 5-way
episodes, 20 support images per class, query batch 64):

* ``in-process``: the per-worker loop (``pipeline.training.meta_train_worker``) without Ray;
* ``ray-1x{N}cpu``: one Ray Train worker holding every CPU;
* ``ray-2x{N/2}cpu``: two workers with gradients all-reduced over gloo.

For each: global episodes/s in the timed steps (the first report interval is warm-up and is
excluded), data-wait share, peak RSS per worker, and for Ray runs the fixed overhead per job =
wall time of ``TorchTrainer.fit()`` minus the time the loop itself ran (worker group start, process
group, checkpoint upload, teardown).

Data comes from procedural datasets ingested into a temporary local catalog, so the figures are
compute and framework cost, not network. Ray runs on a private local instance.

Usage::

    python tests/benchmarks/bench_meta_train.py [--backbone resnet18] [--steps 6] [--json out.json]
    python tests/benchmarks/bench_meta_train.py --device cuda [--precision bf16]   # 1 worker per GPU

With ``--device cuda`` the in-process loop runs on ``cuda:0`` and the Ray runs use one GPU per
worker (``scaling.use_gpu``, NCCL); the 2-worker run needs two GPUs and is skipped with fewer.
Peak GPU memory per worker is reported for CUDA runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
# Loopback only for the private Ray instance (read by Ray at import time).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pipeline.config import MetaTrainConfig  # noqa: E402
from pipeline.data import build_procedural, ingest_dataset  # noqa: E402
from pipeline.training import LocalContext, meta_train_worker, prepare_meta_train, run_meta_train  # noqa: E402

SOURCES = ("blobs", "stripes", "shapes", "textures")


def _config(args: argparse.Namespace, catalog: str, storage: str, name: str, workers: int, cpus: float) -> MetaTrainConfig:
    interval = args.steps // 2
    return MetaTrainConfig.model_validate(dict(
        run_name=name,
        storage_path=storage,
        backbone=args.backbone,
        steps=args.steps,
        report_every=interval,
        checkpoint_every=args.steps if args.steps % interval == 0 else interval,
        data={"catalog_url": catalog, "sources": list(SOURCES), "image_size": args.image_size,
              "prefetch": args.prefetch},
        episodes={"ways": [args.ways, args.ways], "support_per_class": args.support_per_class,
                  "query_size": args.query_size},
        validation={"enabled": False},
        optim={"precision": args.precision},
        scaling={"num_workers": workers, "cpus_per_worker": cpus, "use_gpu": args.device == "cuda"},
        max_failures=0,
        mlflow={"enabled": False},
    ))


def _figures(label: str, reports: list[dict[str, Any]], wall: float | None, workers: int) -> dict[str, Any]:
    """Throughput over the timed (second) interval; overhead from the whole job."""
    timed = reports[-1]
    out = {
        "config": label,
        "workers": workers,
        "episodes_per_s": timed["episodes_per_s"],
        "step_time_s": timed["step_time_s"],
        "data_wait_fraction": timed["data_wait_fraction"],
        "peak_rss_mb_per_worker": timed["peak_rss_mb"],
        "loop_s": timed["loop_elapsed_s"],
    }
    if wall is not None:
        out["job_wall_s"] = wall
        out["fixed_overhead_s"] = wall - timed["loop_elapsed_s"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's arguments; ``--device cuda`` without a visible GPU is an error that says so."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--support-per-class", type=int, default=20)
    parser.add_argument("--query-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="even; the first half is warm-up")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--prefetch", type=int, default=2, help="episodes assembled ahead by a thread (0 = in the loop)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the workers train")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast the losses")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even and >= 2")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    root = Path(tempfile.mkdtemp(prefix="stamp-bench-"))
    os.environ.setdefault("STAMP_HOME", str(root / "home"))
    t0 = time.perf_counter()
    for name in SOURCES:
        ingest_dataset(build_procedural(name, n_per_class=200, seed=0), str(root / "data"), shard_size=400, progress=False)
    catalog = str(root / "data" / "catalog.json")
    print(f"ingested {len(SOURCES)} procedural sources in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    rows = []
    cfg, setup, _ = prepare_meta_train(_config(args, catalog, str(root / "ray"), "inproc", 1, args.cpus))
    ctx = LocalContext(root / "inproc", device="cuda:0" if args.device == "cuda" else "cpu")
    meta_train_worker(cfg, ctx, setup)
    where = "cuda:0" if args.device == "cuda" else f"{args.cpus} threads"
    rows.append(_figures(f"in-process ({where})", ctx.reports, None, 1))
    if args.device == "cuda":
        rows[-1]["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(rows[-1]), file=sys.stderr)

    if not args.skip_ray:
        import ray

        token = root / "ray-token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)  # keep ~/.ray untouched
        ray.init(address="local", num_cpus=args.cpus, num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0,
                 include_dashboard=False, log_to_driver=False)
        try:
            gpus = torch.cuda.device_count() if args.device == "cuda" else 0
            for workers in (1, 2):
                if args.device == "cuda" and workers > gpus:
                    print(f"skipping {workers} GPU workers: {gpus} GPU(s) visible", file=sys.stderr)
                    continue
                cpus = args.cpus / workers
                name = f"ray-{workers}x{cpus:g}cpu"
                t = time.perf_counter()
                res = run_meta_train(_config(args, catalog, str(root / "ray"), name, workers, cpus))
                wall = time.perf_counter() - t
                history = res.result.best_checkpoints  # reports with checkpoints: the last is the timed one
                reports = [m for _, m in history] if history else [res.metrics]
                rows.append(_figures(f"Ray Train {workers} worker(s) x {cpus:g} CPU", reports, wall, workers))
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            ray.shutdown()

    shape = (f"{args.backbone} @ {args.image_size}x{args.image_size}, {args.ways}-way, "
             f"{args.support_per_class}/class support, query {args.query_size}, {args.steps} steps, "
             f"{args.device} {args.precision}")
    print(f"\nMeta-training throughput: {shape}\n")
    print("| config | episodes/s | s/step | data wait | peak RSS/worker (MB) | job wall (s) | fixed overhead (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['episodes_per_s']:.2f} | {r['step_time_s']:.2f} | {100 * r['data_wait_fraction']:.0f}% | "
              f"{r['peak_rss_mb_per_worker']:.0f} | {r.get('job_wall_s', float('nan')):.1f} | "
              f"{r.get('fixed_overhead_s', float('nan')):.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
