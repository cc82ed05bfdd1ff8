#!/usr/bin/env python
"""Hyper-parameter tuning job: Ray Tune (ASHA) over meta-training; registers the best pruner.

Usage::

    python jobs/tune.py --config jobs/configs/tune_small.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_small.yaml

With ``register: true`` the best pruner becomes a new version of ``model_name`` in MLflow, and the
``champion`` alias moves to it only if its val_accuracy beats the current champion's.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import _common  # noqa: F401 - sets up sys.path first

from pipeline.config import TuneConfig


def _run(cfg: TuneConfig) -> Any:
    from pipeline.training import run_tune

    return run_tune(cfg)


def _prepare(cfg: TuneConfig) -> None:
    from pipeline.training import prepare_meta_train

    prepare_meta_train(cfg.meta_train)


def _summary(result: Any) -> dict[str, Any]:
    return {"tune": result.name, "best": asdict(result.best), "pruner_dir": str(result.pruner_dir),
            "registered_version": result.registered_version, "champion_moved": result.champion_moved,
            "mlflow_run_id": result.mlflow_run_id, "trials": [asdict(t) for t in result.trials]}


def main(argv: list[str] | None = None) -> int:
    return _common.run_job("Tune STAMP meta-training with Ray Tune.", TuneConfig, _run, _summary, argv,
                           prepare=_prepare)


if __name__ == "__main__":
    sys.exit(main())
