"""The figures STAMP logs: channels kept per layer, accuracy against MACs, training curves.

Plain ``matplotlib.figure.Figure`` objects (no pyplot, no global state, no files): callers log
them to MLflow (``client.log_figure``, ``log_pruner(plots=...)``) or save them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from stamp_core import PruneSpec


def plot_kept_fractions(specs: Mapping[str, PruneSpec], max_tasks: int = 6) -> Figure:
    """Per-layer fraction of channels kept, one bar series per task (at most ``max_tasks``)."""
    if not specs:
        raise ValueError("plot_kept_fractions needs at least one spec")
    items = list(specs.items())[:max_tasks]
    groups = list(items[0][1].group_sizes)
    fig = Figure(figsize=(max(6.0, 0.45 * len(groups) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(items)
    xs = np.arange(len(groups))
    for i, (task, spec) in enumerate(items):
        fractions = [len(spec.kept.get(g, [])) / spec.group_sizes.get(g, 1) for g in groups]
        ax.bar(xs + (i - (len(items) - 1) / 2) * width, fractions, width, label=f"{task} ({spec.macs_ratio:.2f} MACs)")
    ax.set_xticks(xs, [g.replace(".", "\n", 1) if len(g) > 12 else g for g in groups], fontsize=7, rotation=60)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept channel fraction")
    ax.set_title("Channels kept per layer")
    ax.legend(fontsize=7)
    return fig


def plot_accuracy_vs_macs(curves: Mapping[str, Sequence[tuple[float, float]]], title: str = "Accuracy vs MACs") -> Figure:
    """One line per method/task through ``(macs_ratio, accuracy)`` points."""
    if not curves:
        raise ValueError("plot_accuracy_vs_macs needs at least one curve")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        pts = sorted((float(r), float(a)) for r, a in points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("MACs ratio (pruned / full)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str] | None = None, title: str = "Training") -> Figure:
    """One panel per metric over ``epoch`` (or ``step``, else record index)."""
    if not history:
        raise ValueError("plot_training_curves needs at least one record")
    x_key = next((k for k in ("step", "epoch") if k in history[0]), None)
    if keys is None:
        keys = [k for k, v in history[0].items() if k not in {x_key, "seconds", "epoch", "step"} and isinstance(v, (int, float))]
    if not keys:
        raise ValueError(f"no numeric metric to plot in records with keys {sorted(history[0])}")
    fig = Figure(figsize=(4.0 * len(keys), 3.2), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    xs = [r.get(x_key, i) if x_key else i for i, r in enumerate(history)]
    for ax, key in zip(axes, keys):
        ax.plot(xs, [r.get(key, float("nan")) for r in history])
        ax.set_xlabel(x_key or "record")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig
