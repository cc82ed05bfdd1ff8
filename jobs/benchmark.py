#!/usr/bin/env python
"""Benchmark job: STAMP against pruning baselines on unseen targets at matched MACs.

Usage::

    python jobs/benchmark.py --config jobs/configs/benchmark_real.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/benchmark.py --config jobs/configs/benchmark_real.yaml

The grid runs in the job's driver process (one cell at a time, fixed thread counts, so latencies
are comparable); re-running with the same ``out_dir`` resumes per cell. Prints a JSON summary
(output files, computed / resumed / failed cells, MLflow run) as its last line.
"""

from __future__ import annotations

import sys
from typing import Any

import _common  # noqa: F401 - sets up sys.path first

from pipeline.config import BenchmarkConfig


def _run(cfg: BenchmarkConfig) -> Any:
    from pipeline.apps.benchmark import run_benchmark

    return run_benchmark(cfg)


def _summary(result: Any) -> dict[str, Any]:
    return {"out_dir": str(result.out_dir), "results_csv": str(result.csv_path), "results_md": str(result.markdown_path),
            "plots": [str(p) for p in result.plots], "computed": len(result.computed), "resumed": len(result.skipped),
            "failed": result.failed, "mlflow_run_id": result.mlflow_run_id, "seconds": round(result.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    # The cells run in this driver process (attached to Ray like every job), one at a time, so
    # latencies and times are not skewed by other tasks of the job.
    return _common.run_job("Benchmark STAMP against pruning baselines.", BenchmarkConfig, _run, _summary, argv)


if __name__ == "__main__":
    sys.exit(main())
