"""Experiment: how much of a mask's accuracy is *allocation* (channels kept per layer) and how much is
*ranking* (which channels inside a layer)? Scored on a target's dev split (images held out of its
training split; the test split is never read), so method development may look at it.

Masks, all on the same weights (the pruner's backbone) and through the benchmark's prune path
(physical pruning, BatchNorm recalibration, prototype head, fine-tune):

* ``l1``: torch-pruning's L1 magnitude, per-layer mean-normalised, one global threshold;
* ``uniform``: every layer kept at the same width fraction, first channels;
* ``l1_in_uniform``: uniform allocation, L1 ranking inside each layer;
* ``activation_in_l1``: L1's allocation, ranked by the mean response on the target's sample;
* ``stamp``: the pruner's own mask (from the target's sample);
* ``stamp_mean``: an outcome pruner's choice for the *average source task* (the predictor's fitted feature
  mean), built with the target's own channel statistics: what its choice is worth without adaptivity;
* ``stamp_in_l1``: L1's allocation, ranked by the pruner's keep probabilities;
* ``l1_in_stamp``: the pruner's allocation, ranked by L1;
* ``mixW`` / ``tiltB``: bench_source_allocation's interpolated and depth-tilted allocations, L1 ranking;
* any ``<ranking>_in_<allocation>``: allocation ``l1``, ``uniform``, ``stamp``, ``mixW`` or ``tiltB``; ranking ``l1``,
  ``activation``, ``separability`` (share of a channel's response variance explained by the class on
  the target's sample), ``stamp`` or a registered one-pass criterion (``snip``, ``grasp``,
  ``synflow``, ``random``), e.g. ``snip_in_l1``.

Run from the repository root:
    .venv/bin/python -m tests.benchmarks.bench_allocation --pruner PRUNER_DIR --target digits \\
        [--budgets 0.3 0.1] [--seeds 0 1 2] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.apps.benchmark import dev_split
from pipeline.apps.prune import resolve_data
from pipeline.registry import load_pruner
from stamp_core import PruneSpec, StampPruner, TaskSummary, default_finetune, init_classifier_from_prototypes, prepare_images, prune_and_finetune
from stamp_core.baselines import ScoringInput, get_criterion, list_criteria, score_uniform, select_spec
from stamp_core.channel_generator import channel_statistics
from stamp_core.groups import score_l1
from stamp_core.pruner import spec_from_kept
from stamp_core.candidates import spec_for_fractions
from tests.benchmarks.bench_source_allocation import candidate_fractions

#: masks that are their own allocation and ranking; any other mask is ``<ranking>_in_<allocation>``
_ALLOCATIONS = ("l1", "uniform", "stamp", "stamp_mean")
#: allocations given by per-layer fractions (ranked by L1 unless a ranking is named)
_FRACTION_ALLOCATION = re.compile(r"^(mix[0-9.]+|tilt[+-][0-9.]+)$")
MASKS = ("l1", "uniform", "l1_in_uniform", "activation_in_l1", "stamp", "stamp_in_l1", "l1_in_stamp")


def parse_mask(name: str) -> tuple[str, str | None]:
    """``(allocation, ranking)`` of a mask name, ranking None for the allocation's own (see the module
    docstring); ValueError on a bad name."""
    if name in _ALLOCATIONS or _FRACTION_ALLOCATION.match(name):
        return name, None
    ranking, sep, allocation = name.rpartition("_in_")
    rankings = tuple(dict.fromkeys(("l1", "activation", "separability", "stamp") + tuple(c for c in list_criteria() if not get_criterion(c).trains)))
    if not sep or not (allocation in _ALLOCATIONS or _FRACTION_ALLOCATION.match(allocation)) or ranking not in rankings:
        raise ValueError(f"unknown mask {name!r}: expected one of {', '.join(MASKS)}, mixW, tiltB or <ranking>_in_<allocation> "
                         f"(allocation {'/'.join(_ALLOCATIONS)}/mixW/tiltB, ranking {'/'.join(rankings)})")
    return allocation, ranking


def _ranked(counts: Sequence[int], scores: Sequence[torch.Tensor]) -> list[list[int]]:
    """Top ``counts[g]`` channels of group ``g`` by ``scores[g]``."""
    return [sorted(s.argsort(descending=True)[:n].tolist()) for n, s in zip(counts, scores)]


def _counts(spec: PruneSpec) -> list[int]:
    return [len(k) for k in spec.kept.values()]


def _average_task(pruner: StampPruner, summary: TaskSummary) -> TaskSummary:
    """The outcome predictor's average source task, with this task's channel statistics (for the rankings)."""
    if pruner.config.generator != "outcome":
        raise ValueError(f"stamp_mean needs an outcome pruner (generator 'outcome'), not {pruner.config.generator!r}")
    return TaskSummary(pruner.generator.predictor.feature_mean.float(), summary.channel_stats)


def mask_builders(pruner: StampPruner, x: torch.Tensor, y: torch.Tensor, sample_per_class: int
                  ) -> Callable[[str, float], PruneSpec]:
    """``build(name, r)`` for every mask in :data:`MASKS` on ``pruner``'s weights and the task ``(x, y)``."""
    structure, config = pruner.structure, pruner.backbone.config
    l1 = score_l1(pruner.backbone, structure)
    sample = torch.cat([torch.nonzero(y == c).flatten()[:sample_per_class] for c in y.unique()])
    with torch.no_grad():
        _, responses = pruner.extract_features(x[sample], channel_responses=True)
        summary = pruner.summarize(x[sample], y[sample])
    activation = [r.double().mean(0) for r in responses]
    separability = [st[:, 2].double() for st in channel_statistics(responses, y[sample])]
    scored = copy.deepcopy(pruner.backbone)  # one-batch criteria need a head for the task's classes
    scored.reset_classifier(int(y.max()) + 1)
    init_classifier_from_prototypes(scored, x, y)

    def criterion(name: str, r: float) -> Sequence[torch.Tensor]:
        return get_criterion(name).score(ScoringInput(scored, structure, x, y, r))

    allocations: dict[str, Callable[[float], PruneSpec]] = {
        "l1": lambda r: select_spec(l1, structure, config, r, normalize=True),
        "uniform": lambda r: select_spec(score_uniform(structure), structure, config, r),
        "stamp": lambda r: pruner.generate(x[sample], y[sample], macs_ratio=r, embedding=summary),
        "stamp_mean": lambda r: pruner.generate(x[sample], y[sample], macs_ratio=r, embedding=_average_task(pruner, summary)),
    }
    rankings: dict[str, Callable[[float], Sequence[torch.Tensor]]] = {
        "l1": lambda r: l1,
        "activation": lambda r: activation,
        "separability": lambda r: separability,
        "stamp": lambda r: [p.double() for p in pruner.keep_probabilities(summary, r)],
    }

    def build(name: str, r: float) -> PruneSpec:
        allocation_of, ranking_of = parse_mask(name)
        if _FRACTION_ALLOCATION.match(allocation_of):
            fractions = candidate_fractions(allocation_of, pruner, l1, r, x[sample], y[sample], summary)
            ranking = l1 if ranking_of is None else rankings[ranking_of](r) if ranking_of in rankings else criterion(ranking_of, r)
            return spec_for_fractions(fractions, ranking, structure, config, r)
        allocation = allocations[allocation_of](r)
        if ranking_of is None:
            return allocation
        ranking = rankings[ranking_of](r) if ranking_of in rankings else criterion(ranking_of, r)
        return spec_from_kept(_ranked(_counts(allocation), ranking), structure, config, r)

    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pruner", required=True, help="a saved pruner directory or models:/ URI")
    ap.add_argument("--target", required=True, help="a load_source spec, e.g. digits or npz:PATH?classes=6,7,8,9")
    ap.add_argument("--masks", nargs="+", default=list(MASKS), help=f"default: {' '.join(MASKS)}; or <ranking>_in_<allocation>")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds")
    ap.add_argument("--dev-per-class", type=int, default=50)
    ap.add_argument("--max-train-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None, help="append one JSON line per cell here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for name in args.masks:  # refuse a misspelt mask before any fine-tune
        try:
            parse_mask(name)
        except ValueError as exc:
            ap.error(str(exc))
    torch.set_num_threads(args.threads)
    pruner = load_pruner(args.pruner).eval()
    ds = dev_split(resolve_data(args.target), args.dev_per_class)
    keep = np.concatenate([np.flatnonzero(ds.y_train == c)[: args.max_train_per_class] for c in np.unique(ds.y_train)])
    size = pruner.config.image_size
    x, y = prepare_images(ds.x_train[keep], size), torch.as_tensor(ds.y_train[keep]).long()
    x_dev, y_dev = prepare_images(ds.x_test, size), torch.as_tensor(ds.y_test).long()
    build = mask_builders(pruner, x, y, sample_per_class=20)
    for r in args.budgets:
        for name in args.masks:
            spec = build(name, r)
            t0 = time.perf_counter()
            accs = [prune_and_finetune(pruner.backbone, spec, x, y, x_dev, y_dev, default_finetune(args.epochs, s)).accuracy
                    for s in args.seeds]
            row = {"target": args.target, "r": r, "mask": name, "dev_accuracy": float(np.mean(accs)), "per_seed": accs,
                   "kept_per_group": _counts(spec), "macs_ratio": spec.macs_pruned / spec.macs_full,
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
