"""Experiment: does a meta-trained generator's mask adapt usefully to a task? Cross-evaluation on two
synthetic families that need different channels (hue vs orientation, tests/stamp_core/_tasks.py).

Per configuration (generator, objective, seed, budget): pretrain small_cnn (width 16) on both
families' 12 classes, meta-train a fresh pruner on episodes of both, then for a held-out task of each
family fine-tune (2 epochs, 2 fine-tune seeds) the nets pruned with the task's own mask, the other
family's mask and the mean summary's mask; the same for an untrained pruner (whose mask is L1's).
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

from stamp_core import (MetaConfig, StampPruner, TaskSummary, TrainConfig, build_backbone, make_optimizer,
                        meta_train_step, prune_and_finetune, train_classifier)
from tests.stamp_core._tasks import make_episode, make_images

FAMILIES = ("color", "orientation")


def _pretrained_backbone(gen: torch.Generator) -> torch.nn.Module:
    labels = torch.arange(12).repeat(150)
    x = torch.cat([make_images("color", labels[:900] % 6, gen), make_images("orientation", labels[900:] % 6, gen)])
    y = torch.cat([labels[:900] % 6, 6 + labels[900:] % 6])
    backbone = build_backbone("small_cnn", 12, width=16)
    train_classifier(backbone, x, y, TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=False))
    return backbone


def _task(family: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    y_train, y_test = torch.arange(6).repeat_interleave(20), torch.arange(6).repeat_interleave(40)
    return make_images(family, y_train, g), y_train, make_images(family, y_test, g), y_test


def _cross_evaluate(pruner: StampPruner, tasks: dict, ratio: float) -> dict[str, dict[str, float]]:
    summaries = {f: pruner.summarize(*tasks[f][:2]) for f in FAMILIES}
    mean = TaskSummary.mean(list(summaries.values()))
    finetune = TrainConfig(epochs=2, batch_size=32, lr=0.02, augment=False)
    out = {}
    for f, (x, y, xt, yt) in tasks.items():
        other = next(o for o in FAMILIES if o != f)
        out[f] = {}
        for label, summary in (("own", summaries[f]), ("other", summaries[other]), ("mean", mean)):
            spec = pruner.generate(x, y, macs_ratio=ratio, embedding=summary)
            accs = [prune_and_finetune(pruner.backbone, spec, x, y, xt, yt, dataclasses.replace(finetune, seed=s)).accuracy
                    for s in range(2)]
            out[f][label] = round(100 * sum(accs) / len(accs), 1)
    return out


def run(generator: str, objective: str, seed: int, episodes: int, ratio: float) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    backbone = _pretrained_backbone(gen)
    pruner = StampPruner.create(copy.deepcopy(backbone), generator=generator)
    untrained = StampPruner.create(copy.deepcopy(backbone), generator=generator)
    opt = make_optimizer(pruner, lr=1e-3, backbone_lr=1e-4)
    cfg = MetaConfig(objective=objective, inner_steps=2 if objective == "deployed" else 0)
    t0 = time.perf_counter()
    for _ in range(0, episodes, 4):
        batch = [make_episode(FAMILIES[int(torch.randint(2, (), generator=gen))], gen) for _ in range(4)]
        meta_train_step(pruner, batch, opt, cfg)
    train_seconds = time.perf_counter() - t0
    tasks = {f: _task(f, 1000 + k) for k, f in enumerate(FAMILIES)}
    return {"generator": generator, "objective": objective, "seed": seed, "episodes": episodes, "ratio": ratio,
            "train_seconds": round(train_seconds, 1),
            "trained": _cross_evaluate(pruner, tasks, ratio), "untrained": _cross_evaluate(untrained, tasks, ratio)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", choices=["faithful", "channel"], default="channel")
    ap.add_argument("--objective", choices=["relaxed", "deployed"], default="deployed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        print(json.dumps(run(args.generator, args.objective, seed, args.episodes, args.ratio)), flush=True)


if __name__ == "__main__":
    main()
