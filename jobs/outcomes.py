#!/usr/bin/env python
"""Outcome-table job: deployed accuracy of candidate masks on many source tasks, one Ray task per task.

Usage::

    python jobs/outcomes.py --config jobs/configs/outcomes_natural.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/outcomes.py --config jobs/configs/outcomes_natural.yaml

Re-running the same config skips the tasks already recorded (``max_tasks=N`` grows the table by steps).
The printed ``location`` holds ``parts/`` (one JSON per task) and ``table.jsonl``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import _common  # noqa: F401 - sets up sys.path first

from pipeline.config import OutcomesConfig


def _run(cfg: OutcomesConfig) -> Any:
    from pipeline.training.outcomes import run_outcomes

    result = run_outcomes(cfg)
    if result.failed and not result.new:
        raise RuntimeError(f"every task of this run failed, e.g. {next(iter(result.failed.items()))}")
    return result


def _prepare(cfg: OutcomesConfig) -> None:
    from pipeline.training.outcomes import prepare_outcomes

    prepare_outcomes(cfg)


def main(argv: list[str] | None = None) -> int:
    return _common.run_job("Fill the outcome table (deployed accuracy of candidate masks) with Ray tasks.",
                           OutcomesConfig, _run, asdict, argv, prepare=_prepare)


if __name__ == "__main__":
    sys.exit(main())
