"""Tests for pipeline.plots: the figures hold the data they were given."""

from __future__ import annotations

import pytest
import torch

from pipeline.plots import plot_accuracy_vs_macs, plot_kept_fractions, plot_training_curves
from stamp_core import StampPruner


def tiny_pruner(seed: int) -> StampPruner:
    torch.manual_seed(seed)
    return StampPruner.create(
        "small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    )


def test_plots_are_figures_with_data() -> None:
    specs = {
        "a": tiny_pruner(0).generate(torch.zeros(4, 3, 32, 32), macs_ratio=0.5),
        "b": tiny_pruner(0).generate(torch.zeros(4, 3, 32, 32), macs_ratio=0.3),
    }
    fig = plot_kept_fractions(specs)
    assert len(fig.axes[0].patches) == 2 * len(specs["a"].kept)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert all(0 < h <= 1 for h in heights)
    fig = plot_training_curves([{"epoch": 1, "loss": 1.0, "accuracy": 0.5, "seconds": 2}, {"epoch": 2, "loss": 0.5, "accuracy": 0.7, "seconds": 2}])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    with pytest.raises(ValueError):
        plot_accuracy_vs_macs({})
    fig = plot_accuracy_vs_macs({"stamp": [(0.5, 0.8), (0.3, 0.7)], "uniform": [(0.5, 0.7)]}, title="t")
    lines = fig.axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[0.3, 0.5], [0.5]]  # sorted by MACs ratio
    assert fig.axes[0].get_title() == "t"
