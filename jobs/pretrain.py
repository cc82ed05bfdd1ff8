#!/usr/bin/env python
"""Reference pretraining job: supervised training of the backbone on the union of the source datasets.

Usage::

    python jobs/pretrain.py --config jobs/configs/pretrain_small.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_small.yaml

The printed ``backbone_dir`` (or the run directory) is what a meta-train config's ``pretrained:`` takes.
"""

from __future__ import annotations

import sys
from typing import Any

import _common  # noqa: F401 - sets up sys.path first

from pipeline.config import PretrainConfig


def _run(cfg: PretrainConfig) -> Any:
    from pipeline.training import run_pretrain

    return run_pretrain(cfg)


def _prepare(cfg: PretrainConfig) -> None:
    from pipeline.training import prepare_pretrain

    prepare_pretrain(cfg)


def _summary(result: Any) -> dict[str, Any]:
    return {"run": result.name, "path": result.path, "epoch": result.epoch,
            "backbone_dir": str(result.backbone_dir), "mlflow_run_id": result.mlflow_run_id,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}


def main(argv: list[str] | None = None) -> int:
    return _common.run_job("Pretrain a STAMP backbone with Ray Train.", PretrainConfig, _run, _summary, argv,
                           prepare=_prepare)


if __name__ == "__main__":
    sys.exit(main())
