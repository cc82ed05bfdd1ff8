"""Opt-in test-time selection: the pruner proposes K masks, a short fine-tune on a split of the user's training
data picks one.

The one-pass mask (:meth:`StampPruner.generate`) stays the default; selection trades K short fine-tunes for the
part of the per-task headroom the predictor misses. The selection split is held out of the *training* data only
(a stratified share of each class), so the user's test images are never read; after the choice the caller
fine-tunes the chosen mask on all training images as usual.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from stamp_core.backbones import task_classes
from stamp_core.prune import prune_and_finetune
from stamp_core.pruner import StampPruner, TaskSummary
from stamp_core.spec import PruneSpec
from stamp_core.supervised import TrainConfig


@dataclass
class Selection:
    """The chosen mask and what choosing it measured."""

    spec: PruneSpec
    #: candidate name -> accuracy on the selection split after the short fine-tune, in proposal order
    scores: dict[str, float] = field(default_factory=dict)
    #: the candidate the one-pass pruner would have deployed (the first proposal)
    one_pass: str = ""
    seconds: float = 0.0
    split_images: int = 0


def selection_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, held)`` indices: about ``fraction`` of each class held out (at least one image, and at least one
    left to fit on); classes with a single image are only fitted on."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}: expected a share in (0, 1), e.g. 0.2")
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:n])
        fit.append(idx[n:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def select_mask(pruner: StampPruner, x: torch.Tensor, y: torch.Tensor, macs_ratio: float, k: int,
                finetune: TrainConfig, fraction: float = 0.2, round_to: int = 1, seed: int = 0,
                embedding: TaskSummary | None = None) -> Selection:
    """Score the pruner's ``k`` best-predicted masks by a short fine-tune on a held-out share of ``(x, y)``.

    Args:
        pruner: a pruner whose generator proposes several masks (``generator: outcome``).
        x, y: the task's prepared training images and labels ``0..K-1``.
        macs_ratio: the budget every candidate meets.
        k: candidates to score (>= 1; capped at the pruner's candidates).
        finetune: the short fine-tune each candidate gets (e.g. 1 epoch).
        fraction: share of each class held out to score on.
        round_to: channel multiple per group.
        seed: the split's and the fine-tunes' seed.
        embedding: the task summary the one-pass mask was generated from (``stamp prune`` reads a seeded sample),
            so that the first proposal is that mask; default: the pruner summarizes ``(x, y)`` itself.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive number of candidate masks")
    t0 = time.perf_counter()
    x, y = pruner.check_images(x, y)
    specs = pruner.propose(x, y, macs_ratio, k, round_to, embedding=embedding, num_classes=task_classes(y))
    fit, held = selection_split(y, fraction, seed)
    if len(held) == 0:
        raise ValueError("selection needs at least two training images in some class to hold one out")
    scores: dict[str, float] = {}
    best: PruneSpec | None = None
    short = dataclasses.replace(finetune, seed=seed)
    for spec in specs:
        name = str(spec.metadata.get("candidate", len(scores)))
        acc = prune_and_finetune(pruner.backbone, spec, x[fit], y[fit], x[held], y[held], short).accuracy
        scores[name] = float(acc)
        if best is None or acc > scores[str(best.metadata.get("candidate"))]:
            best = spec
    assert best is not None
    return Selection(spec=best, scores=scores, one_pass=str(specs[0].metadata.get("candidate", "")),
                     seconds=time.perf_counter() - t0, split_images=len(held))
