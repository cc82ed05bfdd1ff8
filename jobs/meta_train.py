#!/usr/bin/env python
"""Distributed STAMP meta-training job.

Usage::

    python jobs/meta_train.py --config jobs/configs/meta_train_small.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/meta_train.py --config jobs/configs/meta_train_small.yaml

Re-running with the same ``run_name`` (and ``storage_path``) resumes from the last checkpoint.
Prints a JSON summary (final step, metrics, pruner directory, MLflow run) as its last line.
"""

from __future__ import annotations

import sys
from typing import Any

import _common  # noqa: F401 - sets up sys.path first

from pipeline.config import MetaTrainConfig


def _run(cfg: MetaTrainConfig) -> Any:
    from pipeline.training import run_meta_train

    return run_meta_train(cfg)


def _prepare(cfg: MetaTrainConfig) -> None:
    from pipeline.training import prepare_meta_train

    prepare_meta_train(cfg)


def _summary(result: Any) -> dict[str, Any]:
    return {"run": result.name, "path": result.path, "step": result.step, "start_step": result.start_step,
            "pruner_dir": str(result.pruner_dir), "mlflow_run_id": result.mlflow_run_id,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}


def main(argv: list[str] | None = None) -> int:
    return _common.run_job("Meta-train a STAMP pruner with Ray Train.", MetaTrainConfig, _run, _summary, argv,
                           prepare=_prepare)


if __name__ == "__main__":
    sys.exit(main())
