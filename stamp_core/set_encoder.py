"""Set Transformer encoder that turns a sample of a dataset into a task embedding.

Blocks follow Lee et al., "Set Transformer" (ICML 2019): MAB (multihead attention block),
SAB, ISAB (induced, linear in the set size) and PMA (pooling by attention). Pooling is two-level:
images of each class are pooled into a class prototype, then prototypes into the task embedding,
so the embedding is invariant to the order of images and of classes and accepts any class count.
Classes of unequal size are padded and masked out of attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MAB(nn.Module):
    """Multihead attention block, pre-norm: ``H = Q' + Attn(LN(Q'), LN(K)); out = H + rFF(LN(H))``.

    The reference Set Transformer normalises after each residual (post-norm). Post-norm squashed
    the difference between sets under the constant learned seeds in our meta-training runs, so the
    task embedding barely depended on the task; pre-norm keeps that difference in the residual
    stream while every sub-layer still sees normalised inputs.
    """

    def __init__(self, dim_q: int, dim_k: int, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.ln_q = nn.LayerNorm(dim_q)
        self.ln_k = nn.LayerNorm(dim_k)
        self.fc_q = nn.Linear(dim_q, dim)
        self.res_q = nn.Linear(dim_q, dim) if dim_q != dim else nn.Identity()
        self.fc_k = nn.Linear(dim_k, dim)
        self.fc_v = nn.Linear(dim_k, dim)
        self.ln_o = nn.LayerNorm(dim)
        self.fc_o = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q`` (B, Nq, dq), ``k`` (B, Nk, dk), ``key_mask`` (B, Nk) bool, True = real element."""
        qp = self.fc_q(self.ln_q(q))
        kn = self.ln_k(k)
        b, nq, d = qp.shape
        h = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)

        # Explicit softmax attention: sets are small, and torch's fused CPU kernel returned NaN
        # gradients for some inputs during meta-training (torch 2.13).
        scores = split(qp) @ split(self.fc_k(kn)).transpose(-1, -2) / math.sqrt(d // h)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = torch.softmax(scores, dim=-1) @ split(self.fc_v(kn))
        out = self.res_q(q) + att.transpose(1, 2).reshape(b, nq, d)
        return out + F.relu(self.fc_o(self.ln_o(out)))


class SAB(nn.Module):
    """Self-attention block (quadratic in the set size)."""

    def __init__(self, dim_in: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.mab = MAB(dim_in, dim_in, dim, num_heads)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(x, x, key_mask)


class ISAB(nn.Module):
    """Induced self-attention block: attend through ``num_inducing`` learned points."""

    def __init__(self, dim_in: int, dim: int, num_heads: int, num_inducing: int) -> None:
        super().__init__()
        self.inducing = nn.Parameter(torch.empty(1, num_inducing, dim))
        nn.init.xavier_uniform_(self.inducing)
        self.mab0 = MAB(dim, dim_in, dim, num_heads)
        self.mab1 = MAB(dim_in, dim, dim, num_heads)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.mab0(self.inducing.expand(x.shape[0], -1, -1), x, key_mask)
        return self.mab1(x, h)


class PMA(nn.Module):
    """Pooling by multihead attention onto ``num_seeds`` learned seeds."""

    def __init__(self, dim: int, num_heads: int, num_seeds: int = 1) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.empty(1, num_seeds, dim))
        nn.init.xavier_uniform_(self.seeds)
        self.mab = MAB(dim, dim, dim, num_heads)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(self.seeds.expand(x.shape[0], -1, -1), x, key_mask)


class _SetPool(nn.Module):
    """ISAB x2 + PMA(1): a set of vectors -> one vector."""

    def __init__(self, dim_in: int, dim: int, num_heads: int, num_inducing: int) -> None:
        super().__init__()
        self.isab1 = ISAB(dim_in, dim, num_heads, num_inducing)
        self.isab2 = ISAB(dim, dim, num_heads, num_inducing)
        self.pma = PMA(dim, num_heads, 1)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.isab2(self.isab1(x, key_mask), key_mask)
        return self.pma(h, key_mask)[:, 0]


class SetEncoder(nn.Module):
    """Features of a set of images (+ optional labels) -> task embedding of width ``dim``.

    Args:
        feature_dim: width of the backbone's pooled penultimate features.
        dim: width of the embedding and of every attention block.
        num_heads: attention heads.
        num_inducing: inducing points of each ISAB.
    """

    def __init__(self, feature_dim: int, dim: int = 128, num_heads: int = 4, num_inducing: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.input = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, dim))
        self.within = _SetPool(dim, dim, num_heads, num_inducing)
        self.across = _SetPool(dim, dim, num_heads, num_inducing)
        self.out = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` (N, feature_dim); ``labels`` (N,) ints or None for the label-free mode."""
        x = self.input(features)
        if labels is None:
            # Label-free: the whole sample is one "class"; the across-level pools a single prototype.
            protos = self.within(x.unsqueeze(0))
        else:
            padded, mask = _group_by_label(x, labels)
            protos = self.within(padded, mask)
        return self.out(self.across(protos.unsqueeze(0))[0])


def _group_by_label(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) + labels -> (K, max_count, d) padded per class and its (K, max_count) validity mask."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_cls = inverse[order]
    position = torch.arange(len(order), device=x.device) - starts[sorted_cls]
    k, width = len(counts), int(counts.max())
    padded = x.new_zeros(k, width, x.shape[1])
    padded[sorted_cls, position] = x[order]
    mask = torch.zeros(k, width, dtype=torch.bool, device=x.device)
    mask[sorted_cls, position] = True
    return padded, mask
