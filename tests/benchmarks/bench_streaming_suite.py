#!/usr/bin/env python
"""Streaming many source datasets: Ray Train meta-training on 64 suite datasets versus 2, from S3.

The source suite (default ``jobs/configs/sources/suite_64.yaml``) is ingested into S3 (a private
SeaweedFS unless ``--endpoint``/``--bucket`` name one; ``--jobs`` ingest processes), then the
same meta-training job runs with ``--workers`` Ray Train workers sharing ``--cpus`` CPUs, once on
``--datasets`` suite datasets (evenly spread over the sorted catalog) and once on 2 (the first
datasets of two different bases), ``--runs`` times each. Each worker reads only its share of the
datasets (``pipeline.data.assign_datasets``) and keeps at most ``--max-open-streams`` S3 bodies
open (``data.max_open_streams``).

Per configuration, medians over every report interval of every run except each run's first
(warm-up: buffers filling):

* episodes/s (global) and data-wait fraction (time the step waited for episodes / step time;
  target: < 5% with 64 datasets);
* S3 GET requests per episode (shards started plus ranged GETs that resume a closed stream,
  summed over workers, over the whole run);
* peak open S3 bodies per worker (each one HTTP connection; the max over workers);
* peak RSS per worker (MiB, the max over workers), and the datasets one worker opened.

Also the suite ingest (images/s) and the size of the catalog read at the start of a job.

Usage::

    python tests/benchmarks/bench_streaming_suite.py [--steps 30] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_streaming import _s3_root  # noqa: E402
from pipeline.config import MetaTrainConfig  # noqa: E402
from pipeline.data import Catalog, ingest_suite, load_suite, s3  # noqa: E402
from pipeline.training import run_meta_train  # noqa: E402

TARGET_WAIT = 0.05


def _pick(names: list[str], catalog: Catalog, n: int) -> list[str]:
    """``n`` datasets spread evenly over the sorted names; for 2, the first of two different bases."""
    if n == 2:
        first: dict[str, str] = {}
        for name in names:
            first.setdefault(catalog.get(name).base or name, name)
        return list(first.values())[:2]
    if n >= len(names):
        return list(names)
    step = len(names) / n
    return [names[int(i * step)] for i in range(n)]


def _config(args: argparse.Namespace, catalog_url: str, storage: str, name: str, sources: list[str]) -> MetaTrainConfig:
    return MetaTrainConfig.model_validate(dict(
        run_name=name,
        storage_path=storage,
        backbone=args.backbone,
        steps=args.steps,
        report_every=args.report_every,
        checkpoint_every=args.steps,
        data={"catalog_url": catalog_url, "sources": sources, "weighting": "base", "image_size": 32,
              "max_open_streams": args.max_open_streams, "prefetch": 2},
        # The shape of jobs/configs/meta_train_suite64.yaml.
        episodes={"ways": [2, 6], "support_per_class": 10, "max_support": 60, "query_size": 32, "per_step": 4},
        pruner={"embed_dim": 64, "hidden_dim": 128, "num_inducing": 16},
        validation={"enabled": False},
        scaling={"num_workers": args.workers, "cpus_per_worker": args.cpus / args.workers},
        max_failures=0,
        mlflow={"enabled": False},
    ))


def _report_log(path: Path) -> Any:
    """A Ray Train callback appending every report (rank 0's: metrics are already aggregated over
    ranks) to a JSON-lines file; it runs in the Train controller, on this machine."""
    from ray.train import UserCallback

    class _Log(UserCallback):  # type: ignore[misc]
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            with open(path, "a") as fh:
                fh.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")

    return _Log()


def _run(args: argparse.Namespace, catalog_url: str, storage: str, label: str, sources: list[str],
         i: int) -> dict[str, Any]:
    cfg = _config(args, catalog_url, storage, f"{label}-{i}-{secrets.token_hex(3)}", sources)
    log = Path(storage) / f"{cfg.run_name}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_meta_train(cfg, callbacks=[_report_log(log)])
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    timed = rows[1:] if len(rows) > 1 else rows
    last = rows[-1]
    episodes = sum(last.get(f"episodes.{n}", 0.0) for n in sources)
    out = {
        "episodes_per_s": [float(r["episodes_per_s"]) for r in timed],
        "data_wait_fraction": [float(r["data_wait_fraction"]) for r in timed],
        "step_time_s": [float(r["step_time_s"]) for r in timed],
        "gets_per_episode": float(last["s3_gets"]) / episodes if episodes else float("nan"),
        "open_streams_peak": float(last["open_streams_peak"]),
        "peak_rss_mb": float(last["peak_rss_mb"]),
        "datasets_drawn": sum(1 for n in sources if last.get(f"episodes.{n}", 0.0) > 0),
        "episodes": episodes,
        "job_wall_s": wall,
    }
    print(f"[bench] {label} run {i}: {json.dumps({k: v for k, v in out.items() if not isinstance(v, list)})}",
          file=sys.stderr, flush=True)
    return out


def _summary(label: str, n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    pooled = {k: [v for r in runs for v in r[k]] for k in ("episodes_per_s", "data_wait_fraction", "step_time_s")}
    return {
        "config": label,
        "datasets": n,
        "runs": len(runs),
        "intervals": len(pooled["episodes_per_s"]),
        "episodes_per_s": statistics.median(pooled["episodes_per_s"]),
        "data_wait_fraction": statistics.median(pooled["data_wait_fraction"]),
        "data_wait_fraction_max": max(pooled["data_wait_fraction"]),
        "step_time_s": statistics.median(pooled["step_time_s"]),
        "gets_per_episode": statistics.median(r["gets_per_episode"] for r in runs),
        "open_streams_peak_per_worker": max(r["open_streams_peak"] for r in runs),
        "peak_rss_mb_per_worker": statistics.median(r["peak_rss_mb"] for r in runs),
        "datasets_drawn": statistics.median(r["datasets_drawn"] for r in runs),
        "job_wall_s": statistics.median(r["job_wall_s"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, default=REPO / "jobs" / "configs" / "sources" / "suite_64.yaml")
    parser.add_argument("--datasets", type=int, default=64, help="datasets of the many-datasets configuration")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--max-open-streams", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2, help="suite ingest processes")
    parser.add_argument("--train", type=int, default=None,
                        help="cap train images per dataset (default: the suite's; >= 600 for 2 workers)")
    parser.add_argument("--endpoint", default=None, help="existing S3 endpoint (default: start SeaweedFS)")
    parser.add_argument("--bucket", default=None)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="stamp-bench-suite-"))
    os.environ.setdefault("STAMP_HOME", str(root / "home"))
    os.chdir(REPO)  # suite base paths are relative to the repository root
    suite = load_suite(args.suite)
    if args.train:
        suite = dataclasses.replace(suite, datasets=tuple(
            dataclasses.replace(d, train=min(d.train, args.train), test=min(d.test, args.train // 5))
            for d in suite.datasets))
    figures: dict[str, Any] = {}
    with _s3_root(args.endpoint, args.bucket, root) as s3_root:
        t0 = time.perf_counter()
        report = ingest_suite(suite, s3_root, jobs=args.jobs, progress=False)
        ingest_s = time.perf_counter() - t0
        catalog_url = f"{s3_root}/catalog.json"
        index = s3.head(catalog_url)  # the index the ingest compacted; entry objects are listed too
        catalog_bytes = index.size if index is not None else 0
        t0 = time.perf_counter()
        catalog = Catalog.load(catalog_url)
        load_s = time.perf_counter() - t0
        figures["ingest"] = {"datasets": len(catalog.names()), "samples": report.samples, "seconds": ingest_s,
                             "images_per_s": report.samples / ingest_s, "jobs": args.jobs,
                             "catalog_bytes": catalog_bytes, "catalog_load_s": load_s}
        print(f"[bench] ingest: {json.dumps(figures['ingest'])}", file=sys.stderr, flush=True)
        names = sorted(catalog.names())

        import ray

        token = root / "ray-token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)  # keep ~/.ray untouched
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        rows = []
        try:
            for n in (args.datasets, 2):
                sources = _pick(names, catalog, n)
                label = f"{len(sources)}-datasets"
                runs = [_run(args, catalog_url, str(root / "ray"), label, sources, i) for i in range(args.runs)]
                rows.append(_summary(label, len(sources), runs))
                print(f"[bench] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
    figures["meta_train"] = rows
    ing = figures["ingest"]
    print(f"\nsuite {suite.name}: {ing['datasets']} datasets, {ing['samples']:,} images ingested in "
          f"{ing['seconds']:.1f}s ({ing['images_per_s']:,.0f} images/s, {args.jobs} jobs); catalog read at "
          f"start: {ing['catalog_bytes']:,} bytes in {ing['catalog_load_s'] * 1000:.0f} ms")
    print(f"\nmeta-training, {args.backbone}, {args.workers} Ray workers on {args.cpus} CPUs, "
          f"max_open_streams={args.max_open_streams}, {args.steps} steps x 4 episodes, medians over "
          f"{args.runs} runs (report intervals after the first)\n")
    print("| datasets | episodes/s | s/step | data wait (median / max) | GETs/episode | peak open S3 bodies/worker "
          "| peak RSS/worker (MiB) | datasets drawn |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['datasets']} | {r['episodes_per_s']:.2f} | {r['step_time_s']:.3f} | "
              f"{100 * r['data_wait_fraction']:.1f}% / {100 * r['data_wait_fraction_max']:.1f}% | "
              f"{r['gets_per_episode']:.2f} | {r['open_streams_peak_per_worker']:.0f} | "
              f"{r['peak_rss_mb_per_worker']:.0f} | {r['datasets_drawn']:.0f} |")
    ok = rows[0]["data_wait_fraction"] < TARGET_WAIT
    print(f"\ntarget: data wait < {100 * TARGET_WAIT:.0f}% of step time with {rows[0]['datasets']} datasets: "
          f"{'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
