"""Channel-aware mask generator: scores every channel from its own response to the task's sample.

The faithful generator (:class:`~stamp_core.mask_generator.MaskGenerator`) maps one set embedding
to per-channel offsets through one output head per layer, so what it can do for a task it has never
seen is limited to interpolating between the masks of source tasks whose embeddings look alike: on
sklearn digits, embedded next to Fashion-MNIST, it handed out a Fashion-MNIST mask that fine-tuned
to 60.7% where L1's reached 89.4%. Here the target is read *per channel* as well: in the same
forward pass that feeds the set encoder, each channel's pooled post-ReLU response over the sample
gives its level, its spread and how well it separates the sample's classes. One small network,
shared by every channel of every layer, turns those statistics, a learned layer embedding, the
layer's cost per channel and a task context (set embedding + budget) into the offset of that
channel's keep-probability logit. So it decides the allocation between layers (through layer-level
statistics and the layer embedding) as well as the ranking inside a layer, for any task, from what
the task's data does to the network rather than from which source it resembles.

The offsets are a zero-initialised residual on the base scores (group L1 by default), so an
untrained generator returns the criterion's mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from stamp_core.mask_generator import _EPS, MaskGenerator

#: per-channel statistics of the pooled responses: log level, log spread, class separability.
NUM_CHANNEL_STATS = 3
#: what the shared channel scorer reads per channel: the statistics z-scored within the layer, the
#: layer's mean statistics, and the channel's base score.
_CHANNEL_INPUTS = 2 * NUM_CHANNEL_STATS + 1
_LAYER_DIM = 8
_CONTEXT_DIM = 32
_SCORER_HIDDEN = 64
_LOG_FLOOR = 1e-3


@dataclass
class TaskSummary:
    """What a generator reads of one task (or, batched, of a meta-batch of tasks).

    Attributes:
        embedding: ``(D,)`` set embedding, or ``(B, D)`` for a meta-batch.
        channel_stats: per prunable group ``(C, NUM_CHANNEL_STATS)`` (``(B, C, F)`` batched), or
            None when the generator does not read channels (faithful mode).
    """

    embedding: torch.Tensor
    channel_stats: list[torch.Tensor] | None = None

    @staticmethod
    def stack(summaries: Sequence["TaskSummary"]) -> "TaskSummary":
        """A meta-batch of single-task summaries."""
        stats = None
        if summaries[0].channel_stats is not None:
            stats = [torch.stack(per_group) for per_group in zip(*(s.channel_stats for s in summaries))]
        return TaskSummary(torch.stack([s.embedding for s in summaries]), stats)

    @staticmethod
    def mean(summaries: Sequence["TaskSummary"]) -> "TaskSummary":
        """The average task: every input averaged over ``summaries`` (the mean-embedding ablation)."""
        if not summaries:
            raise ValueError("TaskSummary.mean needs at least one summary")
        batch = TaskSummary.stack(summaries)
        stats = None if batch.channel_stats is None else [s.mean(0) for s in batch.channel_stats]
        return TaskSummary(batch.embedding.mean(0), stats)

    def to(self, device: torch.device | str) -> "TaskSummary":
        stats = None if self.channel_stats is None else [s.to(device) for s in self.channel_stats]
        return TaskSummary(self.embedding.to(device), stats)


def channel_statistics(responses: Sequence[torch.Tensor], labels: torch.Tensor | None) -> list[torch.Tensor]:
    """Per-channel statistics ``(C, NUM_CHANNEL_STATS)`` of pooled responses ``(N, C)`` per group.

    Columns: log mean response, log standard deviation over the sample, and the share of the
    response's variance explained by the class (between-class / total variance, in [0, 1]; zero
    without labels or with one class). Logs are floored so dead channels stay finite.
    """
    out = []
    for r in responses:
        r = r.double()
        mean = r.mean(0)
        var = r.var(0, unbiased=False)
        separability = torch.zeros_like(mean)
        if labels is not None:
            classes, inverse = torch.unique(labels, return_inverse=True)
            if len(classes) > 1:
                sums = torch.zeros(len(classes), r.shape[1], dtype=r.dtype, device=r.device).index_add_(0, inverse, r)
                counts = torch.bincount(inverse, minlength=len(classes)).to(r.dtype).unsqueeze(1)
                between = ((sums / counts - mean) ** 2 * counts).sum(0) / len(r)
                separability = (between / var.clamp_min(1e-12)).clamp(0.0, 1.0)
        out.append(torch.stack([torch.log(mean + _LOG_FLOOR), 0.5 * torch.log(var + _LOG_FLOOR**2), separability], dim=1).float())
    return out


def channel_response_hook(into: list[torch.Tensor]):
    """A forward hook appending the output's spatially pooled post-ReLU response ``(N, C)`` to ``into``."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        r = F.relu(out)
        into.append(r.mean(dim=tuple(range(2, r.ndim))) if r.ndim > 2 else r)

    return hook


def _within_layer_z(x: torch.Tensor) -> torch.Tensor:
    """z-score along the channel axis (dim -2) of ``(..., C, F)``."""
    return (x - x.mean(-2, keepdim=True)) / x.std(-2, keepdim=True, unbiased=False).clamp_min(1e-3)


class ChannelMaskGenerator(MaskGenerator):
    """Per-channel offsets from a scorer shared across channels and layers (``generator: channel``).

    Keeps the faithful generator's base posteriors, embedding standardisation, trunk and budget
    path; its per-layer output heads are replaced by the shared channel scorer.

    Args:
        group_sizes: channels of each prunable group, in structure order.
        group_costs: MACs one channel of each group costs at full width, as a fraction of the
            network's MACs (tells the scorer what a channel of that layer is worth removing).
        embed_dim, hidden_dim, offset_scale, task_norm: as for :class:`MaskGenerator`.
    """

    def __init__(self, group_sizes: list[int], group_costs: Sequence[float], embed_dim: int = 128,
                 hidden_dim: int = 256, offset_scale: float = 3.0, task_norm: str = "batch") -> None:
        super().__init__(group_sizes, embed_dim, hidden_dim, offset_scale, zero_init_heads=True, task_norm=task_norm)
        if len(group_costs) != len(self.group_sizes):
            raise ValueError(f"got costs for {len(group_costs)} groups: expected {len(self.group_sizes)}")
        del self.heads  # the shared scorer below replaces the per-layer heads
        n = len(self.group_sizes)
        depth = torch.linspace(0.0, 1.0, n) if n > 1 else torch.zeros(1)
        cost = torch.log(torch.as_tensor(group_costs, dtype=torch.float32).clamp_min(1e-9))
        self.register_buffer("layer_descriptors", torch.stack([depth, (cost - cost.mean()) / cost.std().clamp_min(1e-6) if n > 1 else cost * 0], 1))
        #: the base scores' z-values (set by init_base_scores), an input of the scorer
        self.register_buffer("base_logits", torch.zeros(sum(self.group_sizes)))
        self.layer_embedding = nn.Embedding(n, _LAYER_DIM)
        nn.init.normal_(self.layer_embedding.weight, std=0.1)
        self.context = nn.Linear(hidden_dim, _CONTEXT_DIM)
        self.scorer = nn.Sequential(
            nn.Linear(_CHANNEL_INPUTS + _LAYER_DIM + 2 + _CONTEXT_DIM, _SCORER_HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(_SCORER_HIDDEN, _SCORER_HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(_SCORER_HIDDEN, 2),
        )
        nn.init.zeros_(self.scorer[-1].weight)
        nn.init.zeros_(self.scorer[-1].bias)

    @torch.no_grad()
    def init_base_scores(self, scores: Sequence[torch.Tensor], spread: float = 0.5) -> None:
        super().init_base_scores(scores, spread)
        self.base_logits.copy_(torch.cat([(a.detach() - a.detach().mean()) / spread for a in self.a_uc]))

    def forward(self, embedding: torch.Tensor, macs_ratio: float | torch.Tensor,
                channel_stats: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if channel_stats is None:
            raise ValueError(
                "the channel-aware generator reads per-channel statistics of the task's sample: "
                "pass channel_stats (StampPruner.summarize computes them with the embedding)"
            )
        single = embedding.ndim == 1
        e = embedding.reshape(1, -1) if single else embedding
        b = e.shape[0]
        r = torch.as_tensor(macs_ratio, dtype=e.dtype, device=e.device).reshape(-1, 1).expand(b, 1)
        budget = self.budget((r - 0.5) * 4.0)
        ctx = self.context(self.trunk(torch.cat([self.standardize(e), budget], dim=1)))  # (B, K)
        shift_a, shift_b = self.budget_shift(budget).chunk(2, dim=1)
        stats = [s.reshape(1, *s.shape) if single else s for s in channel_stats]
        if len(stats) != len(self.group_sizes):
            raise ValueError(f"got channel statistics for {len(stats)} groups: expected {len(self.group_sizes)}")
        rows = []
        for g, (s, n) in enumerate(zip(stats, self.group_sizes)):
            if s.shape != (b, n, NUM_CHANNEL_STATS):
                raise ValueError(f"group {g}: channel statistics of shape {tuple(s.shape)}, expected {(b, n, NUM_CHANNEL_STATS)}")
            s = s.to(e.dtype)
            layer = torch.cat([self.layer_embedding.weight[g], self.layer_descriptors[g]]).expand(b, n, -1)
            rows.append(torch.cat([_within_layer_z(s), s.mean(1, keepdim=True).expand(b, n, -1), layer], dim=2))
        per_channel = torch.cat(rows, dim=1)  # (B, sum C, ...)
        base = self.base_logits.to(e.dtype).expand(b, -1).unsqueeze(2)
        total = per_channel.shape[1]
        inputs = torch.cat([per_channel, base, ctx.unsqueeze(1).expand(b, total, -1)], dim=2)
        da, db = (self.offset_scale * torch.tanh(self.scorer(inputs))).unbind(2)
        params = []
        offset = 0
        for g, (n, a_uc, b_uc) in enumerate(zip(self.group_sizes, self.a_uc, self.b_uc)):
            a = F.softplus(a_uc + da[:, offset:offset + n] + shift_a[:, g:g + 1]) + _EPS
            bb = F.softplus(b_uc + db[:, offset:offset + n] + shift_b[:, g:g + 1]) + _EPS
            params.append((a[0], bb[0]) if single else (a, bb))
            offset += n
        return params
