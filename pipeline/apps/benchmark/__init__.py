"""STAMP against pruning baselines on unseen targets at matched MACs (``stamp benchmark``).

The grid is target x backbone x weights x method x budget x seed (:mod:`.cells`). Methods differ
only in how they obtain a mask (:mod:`.masks`); every mask then goes through stamp_core's one prune
path and the same fine-tune (:mod:`.run`). The report (:mod:`.report`) separates mask quality from
the weights, gives paired differences over seeds with 95% intervals (:mod:`.stats`), the adaptivity
matrix, accuracy against fine-tune epochs and a ranking at equal wall time. Hyper-parameters come
from the config, chosen on source tasks; a target's test split is only ever scored.
"""

from __future__ import annotations

import os

from pipeline.config import BenchmarkConfig, ConfigError

from pipeline.apps.benchmark.cells import (
    CROSS_PREFIX,
    MASKS_JSONL,
    RESULTS_CSV,
    WEIGHT_SETS,
    BenchmarkError,
    CellKey,
    jaccard_distance,
    plan_cells,
    read_masks,
    read_results,
)
from pipeline.apps.benchmark.report import (
    ACCURACY_PNG,
    BETTER_OF_L1_UNIFORM,
    RESULTS_MD,
    TIME_PNG,
    aggregate,
    cost_matched,
    paired_table,
    plot_benchmark_accuracy_vs_macs,
    plot_time_vs_accuracy,
    results_markdown,
    target_means,
)
from pipeline.apps.benchmark.run import BenchmarkResult, dev_split, run_benchmark, source_tasks
from pipeline.apps.benchmark.stats import PairedDifference, paired_difference


def load_benchmark_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark YAML (ConfigError names each bad key)."""
    from pipeline.config import load_config

    return load_config(path, overrides or [], model=BenchmarkConfig)


__all__ = [
    "ACCURACY_PNG", "CROSS_PREFIX", "MASKS_JSONL", "RESULTS_CSV", "RESULTS_MD", "TIME_PNG", "WEIGHT_SETS",
    "BenchmarkError", "BenchmarkResult", "CellKey", "ConfigError", "PairedDifference", "aggregate", "cost_matched",
    "jaccard_distance", "load_benchmark_config", "paired_difference", "paired_table", "plan_cells",
    "plot_benchmark_accuracy_vs_macs", "plot_time_vs_accuracy", "read_masks", "read_results", "results_markdown",
    "dev_split", "run_benchmark", "source_tasks", "target_means", "BETTER_OF_L1_UNIFORM",
]
