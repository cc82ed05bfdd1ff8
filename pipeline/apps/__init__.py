"""What users run: the `stamp` command and the applications behind it.

``cli`` wires the commands (and imports nothing heavy: `stamp --help` stays fast); ``prune`` is
downstream `stamp prune` (a registered pruner + your data -> a small, fine-tuned, exported
network), ``benchmark`` compares STAMP with pruning baselines at matched MACs, ``demo`` runs the
whole pipeline on the embedded stack. ``terminal`` decides what reaches the terminal (Ray's and
MLflow's lines go to a log file; one progress line per stage) and ``stages`` runs the training
jobs under such a line for the CLI and the demo.

The names below are imported on first use, not with the package: importing
``pipeline.apps.cli`` must not import torch, Ray or MLflow through this ``__init__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "cli": ("app",),
    "prune": ("ExportError", "OutputDirError", "PruneError", "PruneReport", "class_balanced_sample", "load_pruned",
              "locate_pruner", "prune_dataset", "register_pruned", "resolve_data", "resolve_pruner"),
    "benchmark": ("BenchmarkError", "BenchmarkResult", "load_benchmark_config", "run_benchmark"),
    "demo": ("DemoPreset", "run_demo"),
}
__all__ = [
    "app",
    "ExportError", "OutputDirError", "PruneError", "PruneReport", "class_balanced_sample", "load_pruned", "locate_pruner",
    "prune_dataset", "register_pruned", "resolve_data", "resolve_pruner",
    "BenchmarkError", "BenchmarkResult", "load_benchmark_config", "run_benchmark",
    "DemoPreset", "run_demo",
]

if TYPE_CHECKING:  # pragma: no cover - what __getattr__ hands out, for type checkers
    from pipeline.apps.benchmark import BenchmarkError, BenchmarkResult, load_benchmark_config, run_benchmark
    from pipeline.apps.cli import app
    from pipeline.apps.demo import DemoPreset, run_demo
    from pipeline.apps.prune import (
        ExportError,
        OutputDirError,
        PruneError,
        PruneReport,
        class_balanced_sample,
        load_pruned,
        locate_pruner,
        prune_dataset,
        register_pruned,
        resolve_data,
        resolve_pruner,
    )


def __getattr__(name: str) -> Any:
    for module, names in _EXPORTS.items():
        if name in names:
            value = getattr(importlib.import_module(f"pipeline.apps.{module}"), name)
            globals()[name] = value
            return value
    raise AttributeError(f"module 'pipeline.apps' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
