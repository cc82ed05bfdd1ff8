"""Experiment: does a meta-trained generator's mask adapt usefully to a task? Cross-evaluation on two
synthetic families that need different channels (hue vs orientation, tests/stamp_core/_tasks.py).

Per configuration (generator, objective, seed, budget): pretrain small_cnn (width 16) on both
families' 12 classes, meta-train a fresh pruner on episodes of both, then for a held-out task of each
family fine-tune (2 epochs, 2 fine-tune seeds) the nets pruned with the task's own mask, the other
family's mask and the mean summary's mask; the same for an untrained pruner (whose mask is L1's), and the
benchmark's mean-normalised L1 mask (``l1``).
The cross-evaluation test in tests/stamp_core/test_meta.py is one such configuration.

Run from the repository root:
    .venv/bin/python -m tests.benchmarks.bench_cross_evaluation --generator channel --seeds 0 1 2 --ratio 0.1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

from stamp_core import MetaConfig, StampPruner, make_optimizer, meta_train_step
from tests.stamp_core._tasks import FAMILIES, cross_evaluate, held_out_task, l1_accuracy, make_episode, two_family_backbone

def run(generator: str, objective: str, seed: int, episodes: int, ratio: float, macs_weight: float | None = None,
        gradient: str = "plain") -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    backbone = two_family_backbone(gen)
    pruner = StampPruner.create(copy.deepcopy(backbone), generator=generator)
    untrained = StampPruner.create(copy.deepcopy(backbone), generator=generator)
    opt = make_optimizer(pruner, lr=1e-3, backbone_lr=1e-4)
    cfg = MetaConfig(objective=objective, inner_steps=2 if objective == "deployed" else 0, deployed_gradient=gradient)
    if macs_weight is not None:  # the deployed objective's optional budget penalty
        cfg = dataclasses.replace(cfg, macs_weight=macs_weight, deployed_macs_penalty=True)
    t0 = time.perf_counter()
    for _ in range(0, episodes, 4):
        batch = [make_episode(FAMILIES[int(torch.randint(2, (), generator=gen))], gen) for _ in range(4)]
        meta_train_step(pruner, batch, opt, cfg)
    train_seconds = time.perf_counter() - t0
    tasks = {f: held_out_task(f, 1000 + k) for k, f in enumerate(FAMILIES)}

    def scores(p: StampPruner) -> dict[str, dict[str, float]]:
        acc = cross_evaluate(p, tasks, {f: p.summarize(*tasks[f][:2]) for f in FAMILIES}, ratio)
        return {f: {k: round(v, 1) for k, v in a.items()} for f, a in acc.items()}

    return {"generator": generator, "objective": objective, "seed": seed, "episodes": episodes, "ratio": ratio, "macs_weight": macs_weight, "gradient": gradient,
            "train_seconds": round(train_seconds, 1), "trained": scores(pruner), "untrained": scores(untrained),
            "l1": {f: round(v, 1) for f, v in l1_accuracy(pruner.backbone, tasks, ratio).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", choices=["faithful", "channel"], default="channel")
    ap.add_argument("--objective", choices=["relaxed", "deployed"], default="deployed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--macs-weight", type=float, default=None,
                    help="deployed objective: add the budget penalty with this weight (default: off)")
    ap.add_argument("--gradient", choices=["plain", "budget_neutral", "layer_es"], default="plain",
                    help="deployed objective: gradient estimator (layer_es: ES on per-layer keep shifts)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        print(json.dumps(run(args.generator, args.objective, seed, args.episodes, args.ratio, args.macs_weight, args.gradient)), flush=True)


if __name__ == "__main__":
    main()
