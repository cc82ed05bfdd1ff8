"""The outcome generator: a StampPruner generator (``generator: outcome``) that picks one candidate mask per task
and budget from what one forward pass of the task's sample shows, using a model of deployed outcomes.

Where the gradient-trained generators output keep probabilities per channel, this one chooses among a small
named family of masks (:mod:`stamp_core.candidates`: allocations between L1's and uniform width, tilted with
depth, with data-free or data-aware rankings inside layers) the one an :class:`OutcomePredictor` expects to
fine-tune best on the task. The predictor is fitted on an outcome table (the real fine-tune of every candidate
on many source tasks), not meta-trained by gradient: the deployed outcome is its training signal.

The task summary it reads is the probe of :func:`stamp_core.candidates.task_features` (as the ``embedding``)
and the per-channel statistics of the same pass (for the data-aware rankings), so the mean-embedding ablation
(:meth:`StampPruner.mean_embedding`) is the average source task, which the predictor maps to the best shared
candidate. The backbone's L1 scores are kept as buffers: they depend on the weights only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from stamp_core.candidates import FEATURE_NAMES, MaskCandidate, TaskProbe, build_candidate
from stamp_core.groups import PrunableStructure
from stamp_core.outcome_predictor import OutcomePredictor
from stamp_core.spec import PruneSpec


class OutcomeMaskGenerator(nn.Module):
    """Chooses one of ``candidates`` per task and budget.

    Args:
        group_sizes: channels per prunable group (structure order).
        candidates: candidate mask names (stamp_core.candidates grammar); the predictor's outputs.
    """

    def __init__(self, group_sizes: Sequence[int], candidates: Sequence[str]) -> None:
        super().__init__()
        if not candidates:
            raise ValueError("the outcome generator needs candidates: e.g. ['l1', 'uniform', 'tilt+1']")
        for name in candidates:
            MaskCandidate.parse(name)
        self.predictor = OutcomePredictor(candidates, FEATURE_NAMES)
        self.group_sizes = list(group_sizes)
        for g, n in enumerate(self.group_sizes):
            self.register_buffer(f"l1_{g}", torch.zeros(n, dtype=torch.float64))

    @property
    def candidates(self) -> list[str]:
        return self.predictor.candidates

    def init_base_scores(self, scores: Sequence[torch.Tensor], spread: float = 0.5) -> None:
        """Keep the backbone's L1 channel scores (``spread`` is the other generators' knob: unused here)."""
        if [len(s) for s in scores] != self.group_sizes:
            raise ValueError(f"L1 scores for groups of {[len(s) for s in scores]} channels: expected {self.group_sizes}")
        for g, s in enumerate(scores):
            getattr(self, f"l1_{g}").copy_(torch.as_tensor(s, dtype=torch.float64))

    def l1_scores(self) -> list[torch.Tensor]:
        return [getattr(self, f"l1_{g}") for g in range(len(self.group_sizes))]

    def choose(self, features: torch.Tensor, macs_ratio: float) -> str:
        """The candidate the predictor ranks first for a task with ``features`` ``(F,)`` at budget ``macs_ratio``."""
        return self.predictor.rank(features, macs_ratio)[0]

    def build(self, name: str, channel_stats: Sequence[torch.Tensor], structure: PrunableStructure,
              backbone_config: dict[str, Any], macs_ratio: float, round_to: int = 1,
              synflow: Sequence[torch.Tensor] | None = None, num_classes: int | None = None) -> PruneSpec:
        """The spec of candidate ``name`` from the summary's channel statistics (log level, log spread, separability)
        and, for candidates that read them, the backbone's SynFlow scores; the budget is met with a ``num_classes``-way
        head (None: the backbone's)."""
        probe = TaskProbe(l1=self.l1_scores(), activation=[s[:, 0].double() for s in channel_stats],
                          separability=[s[:, 2].double() for s in channel_stats], features={},
                          synflow=None if synflow is None else [s.double() for s in synflow])
        spec = build_candidate(name, probe, structure, backbone_config, macs_ratio, round_to, num_classes)
        spec.metadata = {"method": "stamp", "generator": "outcome", "candidate": name}
        return spec
