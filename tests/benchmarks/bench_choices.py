"""Experiment: which masks does an outcome pruner choose for each target, at each budget? No fine-tune and no
test image: only the target's *training* images are read (the sample a benchmark STAMP cell of seed ``--seed``
reads: 20 per class of its seeded ``--train-per-class`` subset), so this may run before the benchmark to see
whether the choices differ between targets and match the winners the headroom study found on the targets' dev
splits.

Printed per target: its task features (the probe's), and per budget the pruner's three best-ranked candidates
with their predicted accuracy relative to the candidates' mean (points), and its choice for the average source
task (the mean-embedding ablation).

Run from the repository root:
    .venv/bin/python -m tests.benchmarks.bench_choices --pruner .stamp/pruners/stamp-outcome-natural \\
        --targets "npz:../shared/datasets/cifar10.npz" digits [--budgets 0.5 0.3 0.1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pipeline.apps.benchmark.run import per_class_subset
from pipeline.apps.prune import resolve_data, summarize_sample
from pipeline.registry import load_pruner
from stamp_core import prepare_images

TARGETS = ("npz:../shared/datasets/cifar10.npz", "npz:../shared/datasets/dtd10.npz", "npz:../shared/datasets/omniglot.npz",
           "npz:../shared/datasets/fashion_mnist.npz?classes=6,7,8,9", "digits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pruner", required=True, help="an outcome pruner: directory or models:/ URI")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=100, help="the benchmark's max_train_per_class")
    args = ap.parse_args()
    pruner = load_pruner(args.pruner).eval()
    if pruner.config.generator != "outcome":
        ap.error(f"{args.pruner} is a {pruner.config.generator!r} pruner: this script reads outcome pruners")
    predictor = pruner.generator.predictor
    size = pruner.config.image_size
    average = predictor.feature_mean
    for spec in args.targets:
        ds = resolve_data(spec)
        # the data in hand of a benchmark cell of this seed, then the sample its STAMP mask reads
        keep = per_class_subset(ds.y_train, args.train_per_class, args.seed)
        x, y = prepare_images(ds.x_train[keep], size), torch.as_tensor(ds.y_train[keep]).long()
        summary, sample_size = summarize_sample(pruner, x, y, 20, args.seed)
        feats = summary.embedding.double()
        print(f"\n{spec}: {len(np.unique(ds.y_train))} classes, sample of {sample_size}")
        print("  features: " + ", ".join(f"{n} {v:.3g}" for n, v in zip(predictor.feature_names, feats.tolist())))
        for r in args.budgets:
            scores = predictor(feats, r)[0]
            order = torch.argsort(scores, descending=True).tolist()
            top = ", ".join(f"{predictor.candidates[i]} {float(scores[i]):+.1f}" for i in order[:3])
            mean_pick = predictor.candidates[int(predictor(average, r)[0].argmax())]
            print(f"  r={r:g}: {top}   (average source task: {mean_pick})")


if __name__ == "__main__":
    main()
