"""How each benchmark method obtains its mask; everything after the mask is stamp_core's one prune path.

Methods:

- ``full``: no mask (the unpruned reference, fine-tuned the same way).
- any registered criterion (:func:`stamp_core.baselines.list_criteria`: uniform, random, l1, snip,
  grasp, synflow, bbd, or one a user registers): scores on the cell's weights -> the shared calibration.
- ``stamp``: the pruner's one pass over a class-balanced sample of the target.
- ``stamp_mean``: the pruner with the mean embedding of source tasks (is adaptivity doing anything?).
- ``stamp@U``: the pruner's mask generated from target U's sample, applied to another target
  (the adaptivity matrix: a target's own mask should beat masks made for other targets).

STAMP's masks depend only on the pruner, never on the weights they are applied to; applying them to
both weight sets separates the mask's contribution from the meta-trained weights'.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from pipeline.config import BenchmarkConfig
from stamp_core import Backbone, PruneSpec, StampPruner, TaskSummary, init_classifier_from_prototypes, task_classes
from stamp_core.baselines import BBDConfig, ScoringInput, get_criterion, spec_by_criterion

from pipeline.apps.benchmark.cells import CROSS_PREFIX, BenchmarkError, CellKey

STAMP_METHODS = ("stamp", "stamp_mean")


@dataclass
class MaskContext:
    """What a cell's mask may be computed from."""

    cfg: BenchmarkConfig
    pruner: StampPruner
    weights: Backbone  #: the weights this cell prunes (pretrained or meta-trained)
    x: torch.Tensor  #: the target's prepared training images (data in hand)
    y: torch.Tensor
    mean_embedding: TaskSummary | None = None
    #: prepared training images and labels of every target by name (for ``stamp@U``), loaded on demand
    other_samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class MaskResult:
    spec: PruneSpec | None  #: None for the full network
    weights: Backbone  #: the weights to prune (BBD's own trained copy; otherwise the cell's weights)
    train_seconds: float = 0.0  #: a method's own training on the target (BBD), included in the mask time


def obtain_mask(cell: CellKey, ctx: MaskContext) -> MaskResult:
    """The cell's mask at ``cell.budget`` (timing is the caller's: everything here counts as mask time)."""
    method, cfg, pruner = cell.method, ctx.cfg, ctx.pruner
    if method == "full":
        return MaskResult(None, ctx.weights)
    if method == "stamp" or method.startswith(CROSS_PREFIX):
        if method == "stamp":
            xs, ys = ctx.x, ctx.y
        else:
            source = method[len(CROSS_PREFIX):]
            if source not in ctx.other_samples:
                raise BenchmarkError(f"{method}: target {source!r} is not loaded (is it among the configured targets?)")
            xs, ys = ctx.other_samples[source]
        from pipeline.apps.prune import summarize_sample

        embedding, _ = summarize_sample(pruner, xs, ys, cfg.sample_per_class, cell.seed)
        return MaskResult(pruner.generate(ctx.x, ctx.y, macs_ratio=cell.budget, round_to=cfg.round_to, embedding=embedding,
                                          num_classes=task_classes(ctx.y)), ctx.weights)
    if method == "stamp_mean":
        if ctx.mean_embedding is None:
            raise BenchmarkError("the mean embedding was not computed (ablation.sources failed to load)")
        spec = pruner.generate(ctx.x, ctx.y, macs_ratio=cell.budget, round_to=cfg.round_to, embedding=ctx.mean_embedding,
                               num_classes=task_classes(ctx.y))
        return MaskResult(spec, ctx.weights)
    criterion = get_criterion(method)
    # Data-dependent criteria (SNIP, GraSP, BBD) need a head for the target's classes; BBD trains
    # this copy, and the trained copy is what it prunes.
    model = copy.deepcopy(ctx.weights)
    model.reset_classifier(task_classes(ctx.y))
    init_classifier_from_prototypes(model, ctx.x, ctx.y)
    b = cfg.bbd
    inp = ScoringInput(model, pruner.structure, ctx.x, ctx.y, cell.budget, seed=cell.seed, score_batch=cfg.score_batch,
                       bbd=BBDConfig(epochs=b.epochs, batch_size=b.batch_size, lr=b.lr, gate_lr=b.gate_lr,
                                     kl_weight=b.kl_weight, macs_weight=b.macs_weight))
    t0 = time.perf_counter()
    spec = spec_by_criterion(method, inp, model.config, cfg.round_to)
    seconds = time.perf_counter() - t0
    return MaskResult(spec, model if criterion.trains else ctx.weights, seconds if criterion.trains else 0.0)
