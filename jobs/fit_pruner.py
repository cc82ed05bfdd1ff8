#!/usr/bin/env python
"""Fit the outcome pruner (``generator: outcome``) from an outcome table; save it and register it in MLflow.

Usage::

    python jobs/fit_pruner.py --config jobs/configs/stamp_outcome_natural.yaml [key=value ...]

Runs in this process (no Ray): a closed-form fit per penalty, leave-one-group-out over the table's tasks.
The printed ``pruner_dir`` (and ``model_uri`` when MLflow is on) is what ``stamp prune`` and a benchmark's
``models[].pruner`` take.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import _common  # noqa: F401 - sets up sys.path first

from pipeline.config import FitPrunerConfig


def _run(cfg: FitPrunerConfig) -> Any:
    from pipeline.training.outcome_fit import fit_outcome_pruner

    return fit_outcome_pruner(cfg)


def main(argv: list[str] | None = None) -> int:
    return _common.run_job("Fit the outcome pruner from an outcome table.", FitPrunerConfig, _run, asdict, argv,
                           needs_ray=False)


if __name__ == "__main__":
    sys.exit(main())
