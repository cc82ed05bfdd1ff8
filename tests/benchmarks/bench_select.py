"""Experiment: how much of the oracle headroom does test-time selection (``stamp prune --select K``) recover,
and what does it cost? (issue 25, item 4)

For every target's *dev* split (held out of its training split; the test split is never read), budget and
fine-tune seed, the outcome pruner proposes its K best-predicted masks from the same seeded sample
``stamp prune`` reads. Each proposal gets the deployed fine-tune and is scored on the dev split; that gives

* **one-pass**: the first proposal (what ``stamp prune`` deploys without ``--select``);
* **oracle of K**: the best of the K by dev accuracy (what a selector could reach at most);
* **selected**: the proposal :func:`stamp_core.selection.select_mask` picks from a short fine-tune on a
  held-out fifth of the *training* images (what ``stamp prune --select K`` deploys).

``--analyze`` prints per budget the three means, selected − one-pass and oracle − one-pass (paired over
targets x seeds, 95% t interval), the recovered share (sum of selected − one-pass over sum of oracle −
one-pass; not given when the oracle is less than 0.5 points above one-pass on average) and the cost of selection against one deployed fine-tune and against generating the one-pass mask.

Run from the repository root (targets of jobs/configs/benchmark_natural_v3.yaml, dev splits only):
    .venv/bin/python -m tests.benchmarks.bench_select --pruner .stamp/pruners/stamp-outcome-natural \\
        --tasks "npz:../shared/datasets/dtd10.npz" digits --budgets 0.5 0.3 0.1 --k 4 --seeds 0 --out rows.jsonl
    .venv/bin/python -m tests.benchmarks.bench_select --analyze rows.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.apps.prune import summarize_sample
from pipeline.registry import load_pruner
from stamp_core import default_finetune, prepare_images, prune_and_finetune
from stamp_core.selection import select_mask
from tests.benchmarks.bench_headroom import _append, _interval, _short, load_task


def _done(path: str | None) -> set[tuple[str, float, int, int]]:
    try:
        with open(path or "", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return set()
    return {(r["task"], r["r"], r["seed"], r["k"]) for r in rows if r.get("type") == "select"}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pruner = load_pruner(args.pruner).eval()
    size = pruner.config.image_size
    done = _done(args.out)
    for name in args.tasks:
        ds = load_task(name, None, set(), args.dev_per_class)
        keep = np.concatenate([np.flatnonzero(ds.y_train == c)[: args.train_per_class] for c in np.unique(ds.y_train)])
        x, y = prepare_images(ds.x_train[keep], size), torch.as_tensor(ds.y_train[keep]).long()
        x_dev, y_dev = prepare_images(ds.x_test, size), torch.as_tensor(ds.y_test).long()
        for r in args.budgets:
            for seed in args.seeds:
                if (name, r, seed, args.k) in done:
                    continue
                t0 = time.perf_counter()
                summary, _ = summarize_sample(pruner, x, y, args.sample_per_class, seed)
                one_pass = pruner.generate(x, y, macs_ratio=r, embedding=summary)
                generate_seconds = time.perf_counter() - t0
                proposals = pruner.propose(x, y, r, args.k, embedding=summary)
                deployed: dict[str, float] = {}
                finetune_seconds = []
                for spec in proposals:
                    t1 = time.perf_counter()
                    acc = prune_and_finetune(pruner.backbone, spec, x, y, x_dev, y_dev,
                                             default_finetune(args.epochs, seed)).accuracy
                    finetune_seconds.append(time.perf_counter() - t1)
                    deployed[str(spec.metadata["candidate"])] = float(acc)
                chosen = select_mask(pruner, x, y, r, args.k, default_finetune(args.select_epochs, seed),
                                     seed=seed, embedding=summary)
                names = list(deployed)
                row = {"type": "select", "task": name, "r": r, "seed": seed, "k": args.k,
                       "one_pass": str(one_pass.metadata["candidate"]), "chosen": str(chosen.spec.metadata["candidate"]),
                       "proposals": names, "deployed": deployed, "selection_scores": chosen.scores,
                       "generate_seconds": round(generate_seconds, 2), "select_seconds": round(chosen.seconds, 1),
                       "finetune_seconds": round(float(np.median(finetune_seconds)), 1)}
                assert row["one_pass"] == names[0], (row["one_pass"], names)  # generate() deploys the first proposal
                print(json.dumps(row), flush=True)
                _append(args.out, row)


def analyze(paths: Sequence[str]) -> str:
    rows: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows += [r for r in map(json.loads, filter(str.strip, f)) if r.get("type") == "select"]
    if not rows:
        return "no select rows"
    out = ["| r | K | cells | one-pass | selected | oracle of K | selected − one-pass | oracle − one-pass | "
           "recovered | select s / deployed fine-tune s | select s / one-pass mask s |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_budget: dict[tuple[float, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        by_budget[(row["r"], row["k"])].append(row)
    for (r, k), cells in sorted(by_budget.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        one = np.array([100 * c["deployed"][c["one_pass"]] for c in cells])
        sel = np.array([100 * c["deployed"][c["chosen"]] for c in cells])
        best = np.array([100 * max(c["deployed"].values()) for c in cells])
        room = float((best - one).sum())
        # a share of almost no room is noise, not a finding
        share = f"{(sel - one).sum() / room:.0%}" if (best - one).mean() >= 0.5 else "no room (< 0.5 points)"
        cost_ft = np.median([c["select_seconds"] / c["finetune_seconds"] for c in cells])
        cost_gen = np.median([c["select_seconds"] / max(c["generate_seconds"], 1e-3) for c in cells])
        out.append(f"| {r:g} | {k} | {len(cells)} | {one.mean():.1f} | {sel.mean():.1f} | {best.mean():.1f} | "
                   f"{_interval(sel - one)} | {_interval(best - one)} | {share} | {cost_ft:.2f}x | {cost_gen:.0f}x |")
    out += ["", "Per cell (dev top-1 %): one-pass → selected (oracle of K)", ""]
    for c in sorted(rows, key=lambda c: (c["task"], -c["r"], c["seed"])):
        d = c["deployed"]
        out.append(f"- {_short(c['task'])} r={c['r']:g} seed {c['seed']}: {c['one_pass']} {100 * d[c['one_pass']]:.1f} → "
                   f"{c['chosen']} {100 * d[c['chosen']]:.1f} (best {max(d, key=d.get)} {100 * max(d.values()):.1f})")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyze", nargs="+", metavar="JSONL", help="print the analysis of these rows and exit")
    ap.add_argument("--pruner", help="a saved outcome pruner directory or models:/ URI")
    ap.add_argument("--tasks", nargs="+", help="load_source specs of targets (their dev split is scored)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    ap.add_argument("--k", type=int, default=4, help="masks proposed and scored (stamp prune --select K)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="sample, split and fine-tune seeds")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--dev-per-class", type=int, default=100, help="at most a quarter of the smallest class")
    ap.add_argument("--sample-per-class", type=int, default=20, help="what stamp prune's sample reads per class")
    ap.add_argument("--epochs", type=int, default=3, help="the deployed fine-tune")
    ap.add_argument("--select-epochs", type=int, default=1, help="each proposal's short fine-tune when selecting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="append one JSON line per cell here (and skip cells already there)")
    args = ap.parse_args()
    if args.analyze:
        print(analyze(args.analyze))
        return
    if not args.pruner or not args.tasks:
        ap.error("--pruner and --tasks are required unless --analyze is given")
    run(args)


if __name__ == "__main__":
    main()
