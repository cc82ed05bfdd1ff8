"""Budget-conditioned mask generator with Kumaraswamy posteriors over channel keep probabilities.

For each prunable group the generator outputs per-channel Kumaraswamy(a, b) parameters of the keep
probability ``pi`` (Beta-Bernoulli dropout, Lee et al. 2018), conditioned on the task embedding
``s`` and the target MACs ratio ``r``. The prior is Beta(alpha, 1); small ``alpha`` favours
dropping channels. The module-level functions are the closed forms the loss uses.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EULER_GAMMA = 0.5772156649015329
_EPS = 1e-6

#: Base parameters from the design: a = softplus(2.0) ~ 2.13, b = softplus(0.5413) ~ 1.0.
A_UC_INIT = 2.0
_BUDGET_DIM = 32
B_UC_INIT = 0.5413
#: how task embeddings are normalised: "batch" (v2, TaskStandardize over a meta-batch) or
#: "running" (v1, RunningStandardize + LayerNorm).
TASK_NORMS = ("batch", "running")


def kumaraswamy_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``E[pi] = b * B(1 + 1/a, b)`` for ``pi ~ Kumaraswamy(a, b)``."""
    one_over_a = 1.0 / a
    log_beta = torch.lgamma(1.0 + one_over_a) + torch.lgamma(b) - torch.lgamma(1.0 + one_over_a + b)
    return b * torch.exp(log_beta)


def kumaraswamy_sample(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Reparameterised sample by the inverse CDF ``pi = (1 - u^(1/b))^(1/a)``."""
    if u is None:
        u = torch.rand_like(a)
    u = u.clamp(_EPS, 1.0 - _EPS)
    return (1.0 - u.pow(1.0 / b)).clamp_min(_EPS).pow(1.0 / a).clamp(_EPS, 1.0 - _EPS)


def kl_kumaraswamy_beta(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Closed-form ``KL(Kumaraswamy(a, b) || Beta(alpha, 1))``, elementwise."""
    return (
        (1.0 - alpha / a) * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b)
        + torch.log(a * b)
        - math.log(alpha)
        - (b - 1.0) / b
    )


def relaxed_bernoulli(pi: torch.Tensor, temperature: float, u: torch.Tensor | None = None) -> torch.Tensor:
    """Concrete relaxation of ``Bernoulli(pi)``: differentiable gates in (0, 1)."""
    if u is None:
        u = torch.rand_like(pi)
    u = u.clamp(_EPS, 1.0 - _EPS)
    logits = torch.log(pi) - torch.log1p(-pi) + torch.log(u) - torch.log1p(-u)
    return torch.sigmoid(logits / temperature)


class RunningStandardize(nn.Module):
    """Standardise task embeddings with running statistics over the meta-training tasks.

    Without it, meta-training on some seeds drove every task's embedding onto one shared direction
    (cosine similarity between task families 0.45 -> 0.99 within 100 episodes): the generator used
    that direction as a bias for the mask all tasks share, and the task-specific part became too
    small to move the mask. Measuring the embedding against the running mean of all tasks leaves
    the generator only what differs between tasks; the shared mask lives in its biases.
    Statistics update in training mode only (one task per call), like BatchNorm's running stats.

    Args:
        dim: embedding width.
        momentum: weight of the newest task (after the first ``1 / momentum`` tasks, which are averaged).
    """

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_tasks", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.num_tasks += 1
                m = max(1.0 / float(self.num_tasks), self.momentum)
                delta = x.detach().reshape(-1, x.shape[-1]).mean(0).to(self.running_mean.dtype) - self.running_mean
                self.running_mean.add_(m * delta)
                if int(self.num_tasks) > 1:
                    self.running_var.lerp_(delta * delta, m)
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt()


class TaskStandardize(nn.Module):
    """Centre and scale a meta-batch of task embeddings against each other, gradient flowing.

    v1 measured one task at a time against running statistics, i.e. against the drift of the
    embedding over training rather than the spread between tasks, and a LayerNorm then blew the
    near-mean remainder up into an arbitrary direction: within 40 resnet20 episodes every task had
    the same embedding (min cosine 1.000). Here a training batch of ``B >= 2`` tasks is centred on
    its own mean and divided by its own RMS spread, so what reaches the generator always has unit
    spread between tasks: collapsing the embeddings cannot remove the task signal, only amplify
    noise, which costs the loss. In eval mode (one task) the running mean and spread of the
    training batches stand in. A single task in training mode is measured like in eval mode and
    leaves the statistics alone.

    Args:
        dim: embedding width.
        momentum: weight of the newest batch in the running statistics.
    """

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_scale", torch.ones(()))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.ndim == 2 and x.shape[0] >= 2:
            mean = x.mean(0)
            centred = x - mean
            scale = centred.pow(2).mean().sqrt()
            with torch.no_grad():
                self.num_batches += 1
                m = max(1.0 / float(self.num_batches), self.momentum)
                # Statistics stay float32 whatever autocast computed the batch in (bf16).
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_scale.lerp_(scale.detach().to(self.running_scale.dtype), m)
            return centred / (scale + self.eps)
        return (x - self.running_mean) / (self.running_scale + self.eps)


class MaskGenerator(nn.Module):
    """``[std(s) ; phi(r)]`` -> per-group Kumaraswamy parameters ``(a, b)``.

    Args:
        group_sizes: channels of each prunable group, in structure order.
        embed_dim: width of the task embedding ``s``.
        hidden_dim: width of the MLP trunk.
        offset_scale: bound on the per-channel offsets to the base parameters (before softplus).
        zero_init_heads: start the task-dependent offsets at zero (a residual on base scores).
        task_norm: "batch" (v2: standardise a meta-batch of tasks against each other) or
            "running" (v1: running statistics of single tasks, then a LayerNorm).
    """

    def __init__(self, group_sizes: list[int], embed_dim: int = 128, hidden_dim: int = 256, offset_scale: float = 3.0,
                 zero_init_heads: bool = False, task_norm: str = "running") -> None:
        super().__init__()
        self.group_sizes = list(group_sizes)
        # Task/budget offsets are bounded: unbounded ones drove keep probabilities to 1e-25 within
        # a few hundred episodes, where no gradient flows and no task can revive a channel.
        self.offset_scale = offset_scale
        # The embedding is normalised and the budget gets its own features, so neither input's
        # scale can drown the other: the generator must stay sensitive to both task and budget.
        if task_norm not in TASK_NORMS:
            raise ValueError(f"task_norm={task_norm!r}: expected one of {', '.join(TASK_NORMS)}")
        self.task_norm = task_norm
        if task_norm == "batch":
            self.embed_std = TaskStandardize(embed_dim)
        else:  # v1: running statistics of one task at a time, then a LayerNorm
            self.embed_center = RunningStandardize(embed_dim)
            self.embed_norm = nn.LayerNorm(embed_dim)
        self.budget = nn.Sequential(nn.Linear(1, _BUDGET_DIM), nn.ReLU(inplace=True))
        self.trunk = nn.Sequential(
            nn.Linear(embed_dim + _BUDGET_DIM, hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, 2 * c) for c in self.group_sizes)
        for head in self.heads:
            # Default-scale weights, zero bias: offsets average to zero, so keep probabilities
            # start around the base posterior, yet they depend on the task from the first step.
            # Near-zero heads (tried: 0.1x and 1e-3 std) close the path from the set encoder to
            # the mask, and after hundreds of episodes masks still ignored the task (v1 objective).
            # With base scores from a criterion (init_base_scores) the heads are a zero-initialised
            # residual instead, so the first mask is exactly the criterion's.
            nn.init.zeros_(head.bias)
            if zero_init_heads:
                nn.init.zeros_(head.weight)
        # Meeting a budget is mostly one shift of every channel of a group; giving the budget that
        # direct path (zero-initialised) made E[MACs] track r within ~100 episodes instead of ~400.
        self.budget_shift = nn.Linear(_BUDGET_DIM, 2 * len(self.group_sizes))
        nn.init.zeros_(self.budget_shift.weight)
        nn.init.zeros_(self.budget_shift.bias)
        self.a_uc = nn.ParameterList(nn.Parameter(torch.full((c,), A_UC_INIT)) for c in self.group_sizes)
        self.b_uc = nn.ParameterList(nn.Parameter(torch.full((c,), B_UC_INIT)) for c in self.group_sizes)

    @torch.no_grad()
    def init_base_scores(self, scores: Sequence[torch.Tensor], spread: float = 0.5) -> None:
        """Start the base posteriors at a channel criterion (higher score = keep more likely).

        ``a`` is set from the z-scored log of each group's scores divided by their mean, one
        standardisation across all groups, so the global ranking of ``E[pi]`` (what
        :func:`~stamp_core.pruner.calibrate_masks` thresholds) is exactly the ranking of the
        mean-normalised scores the criterion's own baseline thresholds. With zero-initialised
        heads and budget path the first mask is the criterion's mask at every budget.

        Args:
            scores: one non-negative 1-D tensor per group, in group order (e.g. ``score_l1``).
            spread: standard deviation of the ``a`` logits around their default.
        """
        if len(scores) != len(self.group_sizes):
            raise ValueError(f"got scores for {len(scores)} groups: expected {len(self.group_sizes)}")
        logs = []
        for g, (s, n) in enumerate(zip(scores, self.group_sizes)):
            s = torch.as_tensor(s, dtype=torch.float64).flatten()
            if s.numel() != n or not torch.isfinite(s).all() or (s < 0).any():
                raise ValueError(f"group {g}: expected {n} finite non-negative scores, got {s.numel()} values")
            rel = s / s.mean().clamp_min(1e-300)
            logs.append(torch.log(rel.clamp_min(1e-12)))
        flat = torch.cat(logs)
        mu, sd = flat.mean(), flat.std().clamp_min(1e-12) if flat.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
        for a_uc, lg in zip(self.a_uc, logs):
            a_uc.copy_((A_UC_INIT + spread * (lg - mu) / sd).to(a_uc.dtype))

    def standardize(self, embedding: torch.Tensor) -> torch.Tensor:
        """What the trunk reads of ``(B, D)`` task embeddings."""
        if self.task_norm == "batch":
            return self.embed_std(embedding)
        return self.embed_norm(self.embed_center(embedding))

    def forward(self, embedding: torch.Tensor, macs_ratio: float | torch.Tensor,
                channel_stats: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Kumaraswamy ``(a, b)`` per group: ``(C,)`` each for one ``(D,)`` embedding and a scalar
        budget, ``(B, C)`` for a meta-batch of ``(B, D)`` embeddings and ``B`` budgets.
        ``channel_stats`` is ignored: this (faithful) generator reads the set embedding only."""
        single = embedding.ndim == 1
        e = embedding.reshape(1, -1) if single else embedding
        r = torch.as_tensor(macs_ratio, dtype=e.dtype, device=e.device).reshape(-1, 1).expand(e.shape[0], 1)
        budget = self.budget((r - 0.5) * 4.0)
        h = self.trunk(torch.cat([self.standardize(e), budget], dim=1))
        shift_a, shift_b = self.budget_shift(budget).chunk(2, dim=1)
        params = []
        for g, (head, a_uc, b_uc) in enumerate(zip(self.heads, self.a_uc, self.b_uc)):
            da, db = (self.offset_scale * torch.tanh(head(h))).chunk(2, dim=1)
            a = F.softplus(a_uc + da + shift_a[:, g:g + 1]) + _EPS
            b = F.softplus(b_uc + db + shift_b[:, g:g + 1]) + _EPS
            params.append((a[0], b[0]) if single else (a, b))
        return params
