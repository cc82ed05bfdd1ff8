"""Meeting a MACs budget exactly: one global threshold on channel scores, found on the exact MACs model.

Every mask in STAMP (the pruner's, every baseline's, every candidate's) goes through :func:`calibrate_masks`,
so methods differ only in how they score channels, never in how closely they meet the budget.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from stamp_core.groups import PrunableStructure
from stamp_core.spec import PruneSpec

__version__ = "0.1.0"


def _fill_budget(counts: np.ndarray, ranked_groups: np.ndarray, start: int, sizes: np.ndarray,
                 structure: PrunableStructure, budget: float) -> np.ndarray:
    """Add the next-ranked channels that still fit, skipping those that would exceed the budget.

    MACs grow by steps of different sizes per group (a channel of a wide late layer costs more
    than one of the stem), so the largest top-M can stop well short of the budget when the next
    channel is an expensive one; skewed scores left a SynFlow mask at 0.469 of full for r=0.5.
    Within each group channels are still taken in score order.
    """
    taken = np.bincount(ranked_groups[:start], minlength=len(sizes))
    blocked = np.zeros(len(sizes), dtype=bool)
    tolerance = 1e-3 * structure.macs_full
    for g in ranked_groups[start:]:
        taken[g] += 1
        if blocked[g] or taken[g] <= counts[g] or counts[g] >= sizes[g]:
            continue  # already kept (each group's first channel is always kept), full or blocked
        counts[g] += 1
        macs = structure.macs(torch.from_numpy(counts).to(structure.device)).item()
        if macs > budget:
            counts[g] -= 1
            # A group's next channel never gets cheaper (other groups only grow): skip g from now on.
            blocked[g] = True
        elif budget - macs < tolerance:
            break
    return counts


def deployed_structure(structure: PrunableStructure, num_classes: int | None) -> PrunableStructure:
    """The cost model of the net a task deploys: ``structure`` with a ``num_classes``-way head (None: as it is)."""
    return structure if num_classes is None else structure.with_classifier_outputs(num_classes)


def calibrate_masks(
    probs: Sequence[torch.Tensor],
    structure: PrunableStructure,
    macs_ratio: float,
    round_to: int = 1,
) -> list[list[int]]:
    """Kept channel indices per group for the largest global top-M whose MACs fit the budget.

    ``structure`` is the cost model the budget holds for: pass :func:`deployed_structure` of the backbone's for the
    net a task deploys (its head rebuilt for the task's classes).

    Channels are ranked by keep probability across all groups (ties: by relative position in
    their group, so equal scores prune groups evenly). Taking the top M of that ranking is one
    global threshold; M is found by bisection on the exact MACs model, which is monotone in M.
    Without rounding, the channels ranked after M that still fit are then added in rank order.
    Every group keeps at least one channel (``round_to`` of them when rounding).
    """
    sizes = [len(p) for p in probs]
    scores = torch.cat([p.detach().double().flatten().cpu() for p in probs]).numpy()
    group_of = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])
    rel_pos = np.concatenate([np.arange(n) / n for n in sizes])
    order = np.lexsort((rel_pos, -scores))  # primary: score desc; secondary: relative position
    ranked_groups = group_of[order]
    budget = macs_ratio * structure.macs_full
    size_arr = np.array(sizes)

    def counts_for(m: int) -> torch.Tensor:
        c = np.bincount(ranked_groups[:m], minlength=len(sizes))
        c = np.minimum(np.maximum(c, 1), size_arr)
        if round_to > 1:
            c = np.minimum(np.ceil(c / round_to) * round_to, size_arr)
        return torch.from_numpy(c.astype(np.float64)).to(structure.device)

    if structure.macs(counts_for(0)).item() > budget:
        floor = structure.macs(counts_for(0)).item() / structure.macs_full
        raise ValueError(
            f"macs_ratio={macs_ratio} is below the smallest reachable ratio {floor:.4f} for this "
            f"backbone (one channel per group, round_to={round_to}): choose a larger budget"
        )
    lo, hi = 0, len(scores)
    while lo < hi:  # largest m with macs(m) <= budget
        mid = (lo + hi + 1) // 2
        if structure.macs(counts_for(mid)).item() <= budget:
            lo = mid
        else:
            hi = mid - 1
    counts = counts_for(lo).cpu().numpy().copy()
    if round_to == 1:
        counts = _fill_budget(counts, ranked_groups, lo, size_arr, structure, budget)
    counts = counts.astype(np.int64).tolist()
    kept = []
    offset = 0
    for g, n in enumerate(sizes):
        local = np.lexsort((np.arange(n), -scores[offset:offset + n]))[: counts[g]]
        kept.append(sorted(int(i) for i in local))
        offset += n
    return kept


def spec_from_kept(
    kept: Sequence[Sequence[int]],
    structure: PrunableStructure,
    backbone_config: dict[str, Any],
    macs_ratio: float | None,
    version: str = __version__,
    metadata: dict[str, Any] | None = None,
) -> PruneSpec:
    """The PruneSpec keeping ``kept[g]`` channels of group ``g``, with exact MACs and params."""
    if len(kept) != structure.num_groups:
        raise ValueError(f"got kept channels for {len(kept)} groups: expected {structure.num_groups}")
    counts = torch.tensor([len(k) for k in kept], dtype=torch.float64, device=structure.device)
    return PruneSpec(
        backbone=dict(backbone_config),
        input_shape=structure.input_shape,
        kept={g.name: [int(i) for i in k] for g, k in zip(structure.groups, kept)},
        group_sizes={g.name: g.size for g in structure.groups},
        macs_full=structure.macs_full,
        macs_pruned=int(structure.macs(counts).item()),
        params_full=structure.params_full,
        params_pruned=structure.params(counts),
        macs_ratio_target=macs_ratio,
        pruner_version=version,
        metadata=dict(metadata or {}),
    )
