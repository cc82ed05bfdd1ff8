"""Experiment: does the best *allocation* (channels kept per layer) differ between source tasks, and
can a task's sample predict it? The question behind STAMP's task adaptivity (issue 16).

For each source dataset of a catalog (never a benchmark target) and each budget, a few candidate
allocations are scored by the deployed path (physical pruning, BatchNorm recalibration, prototype
head, fine-tune) on a dev split held out of the source's *training* split. Every candidate ranks
channels inside a layer by L1 magnitude and differs only in the fraction of each layer it keeps:

* ``l1``: the fractions of torch-pruning's L1 mask (per-layer mean-normalised, global threshold);
* ``uniform``: the same fraction in every layer;
* ``mixW``: ``W`` x L1's fractions + (1 - ``W``) x uniform's, e.g. ``mix0.5``;
* ``tiltB``: uniform's fractions times ``exp(B * (depth - 0.5))``, depth 0 for the first group and 1
  for the last: ``tilt+1`` keeps deep layers wider, ``tilt-1`` shallow ones;
* ``stamp``: the fractions of the pruner's own mask for the task's sample.

Every fraction vector is met exactly at the budget by one global threshold on
``fraction[layer] - (rank inside the layer + 0.5) / width`` (the calibration all masks share).

``--analyze`` reads the JSONL rows back and prints, per budget: mean accuracy per candidate and base
dataset family, the oracle (best candidate per task: an upper bound inflated by seed noise), and two
cross-validated predictors: the candidate best on average over the other tasks (no adaptivity) and
the candidate best over the 5 nearest other tasks in the pruner's embedding space (adaptivity from
the set embedding), holding out either the task's whole family (mnist, fashion, stripes, ...: the
harsh case) or every domain variant of its class subset (a new class subset of a known base, as
Fashion-MNIST 6-9 is for the Fashion-MNIST 0-5 sources). A task-adaptive allocation earns its place
only if the second beats the first.

Run from the repository root (sources from jobs/configs/sources/suite_64.yaml, ingested locally):
    .venv/bin/python -m tests.benchmarks.bench_source_allocation --pruner PRUNER_DIR \\
        --catalog .stamp/suite64/catalog.json --datasets NAME ... --candidates l1 uniform tilt-1 tilt+1 stamp \\
        [--budgets 0.3 0.1] [--seeds 0 1] --out rows.jsonl
    .venv/bin/python -m tests.benchmarks.bench_source_allocation --analyze rows.jsonl [more.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import time
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.apps.benchmark import dev_split
from pipeline.apps.prune import load_catalog_dataset, resolve_data
from pipeline.data import Catalog
from pipeline.registry import load_pruner
from stamp_core import PruneSpec, StampPruner, default_finetune, prepare_images, prune_and_finetune
from stamp_core.baselines import score_uniform, select_spec
from stamp_core.candidates import spec_for_fractions
from stamp_core.groups import PrunableStructure, score_l1

_CANDIDATE = re.compile(r"^(l1|uniform|stamp|mix(?P<w>[0-9.]+)|tilt(?P<b>[+-][0-9.]+))$")


def _fractions(spec: PruneSpec, structure: PrunableStructure) -> list[float]:
    return [len(k) / g.size for k, g in zip(spec.kept.values(), structure.groups)]


def candidate_fractions(name: str, pruner: StampPruner, l1: Sequence[torch.Tensor], r: float,
                        x: torch.Tensor, y: torch.Tensor, summary) -> list[float]:
    """Per-group keep fractions of candidate ``name`` at budget ``r`` (see the module docstring)."""
    found = _CANDIDATE.match(name)
    if not found:
        raise ValueError(f"unknown candidate {name!r}: expected l1, uniform, stamp, mixW (0<=W<=1) or tiltB (e.g. tilt+1)")
    structure, config = pruner.structure, pruner.backbone.config
    f_uniform = _fractions(select_spec(score_uniform(structure), structure, config, r), structure)
    if name == "uniform":
        return f_uniform
    if name == "stamp":
        return _fractions(pruner.generate(x, y, macs_ratio=r, embedding=summary), structure)
    f_l1 = _fractions(select_spec(l1, structure, config, r, normalize=True), structure)
    if name == "l1":
        return f_l1
    if found["w"] is not None:
        w = float(found["w"])
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"candidate {name!r}: the mix weight must be in [0, 1]")
        return [w * a + (1 - w) * b for a, b in zip(f_l1, f_uniform)]
    beta, last = float(found["b"]), max(len(f_uniform) - 1, 1)
    return [min(1.0, u * math.exp(beta * (g / last - 0.5))) for g, u in enumerate(f_uniform)]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pruner = load_pruner(args.pruner).eval()
    structure, config = pruner.structure, pruner.backbone.config
    l1 = score_l1(pruner.backbone, structure)
    size = pruner.config.image_size
    catalogued = set(Catalog.load(args.catalog).names())
    for name in args.datasets:
        # a catalog name, or a load_source spec (a benchmark target's dev split: never its test split)
        data = load_catalog_dataset(args.catalog, name) if name in catalogued else resolve_data(name)
        ds = dev_split(data, args.dev_per_class)
        keep = np.concatenate([np.flatnonzero(ds.y_train == c)[: args.train_per_class] for c in np.unique(ds.y_train)])
        x, y = prepare_images(ds.x_train[keep], size), torch.as_tensor(ds.y_train[keep]).long()
        x_dev, y_dev = prepare_images(ds.x_test, size), torch.as_tensor(ds.y_test).long()
        sample = torch.cat([torch.nonzero(y == c).flatten()[: args.sample_per_class] for c in y.unique()])
        with torch.no_grad():
            summary = pruner.summarize(x[sample], y[sample])
        for r in args.budgets:
            for cand in args.candidates:
                spec = spec_for_fractions(candidate_fractions(cand, pruner, l1, r, x[sample], y[sample], summary),
                                          l1, structure, config, r)
                t0 = time.perf_counter()
                accs = [prune_and_finetune(pruner.backbone, spec, x, y, x_dev, y_dev, default_finetune(args.epochs, s)).accuracy
                        for s in args.seeds]
                row = {"dataset": name, "r": r, "candidate": cand, "accuracy": float(np.mean(accs)), "per_seed": accs,
                       "kept_per_group": [len(k) for k in spec.kept.values()], "macs_ratio": spec.macs_pruned / spec.macs_full,
                       "seconds": round(time.perf_counter() - t0, 1), "embedding": summary.embedding.tolist()}
                print(json.dumps({k: v for k, v in row.items() if k != "embedding"}), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def _family(dataset: str) -> str:
    return dataset.split("-")[0]


def _class_subset(dataset: str) -> str:
    """``mnist-c0-2-4-6-8-inv`` -> ``mnist-c0-2-4-6-8``: one base's classes, whatever the domain."""
    found = re.match(r"^([a-z]+)(-c\d+(?:-\d+)*)?", dataset)
    return found.group(0) if found and found.group(2) else dataset.split("-")[0] + "-all"


def analyze(paths: Sequence[str], neighbours: int = 5) -> str:
    """The per-budget table described in the module docstring, as text."""
    acc: dict[tuple[str, float], dict[str, float]] = collections.defaultdict(dict)
    per_seed: dict[tuple[str, float], dict[str, list[float]]] = collections.defaultdict(dict)
    embedding: dict[str, np.ndarray] = {}
    for path in paths:
        for line in open(path):
            row = json.loads(line)
            acc[(row["dataset"], row["r"])][row["candidate"]] = 100 * row["accuracy"]
            per_seed[(row["dataset"], row["r"])][row["candidate"]] = [100 * v for v in row["per_seed"]]
            embedding[row["dataset"]] = np.asarray(row["embedding"])
    candidates = sorted({c for cells in acc.values() for c in cells})
    out = []
    for r in sorted({k[1] for k in acc}, reverse=True):
        keys = sorted(k for k in acc if k[1] == r and len(acc[k]) == len(candidates))
        if not keys:
            continue
        names = [k[0] for k in keys]
        a = np.array([[acc[k][c] for c in candidates] for k in keys])
        out.append(f"r={r}: {len(keys)} tasks\n  {'family':10s} {'n':>3s} " + " ".join(f"{c:>8s}" for c in candidates))
        for fam in sorted({_family(n) for n in names}):
            rows = [i for i, n in enumerate(names) if _family(n) == fam]
            out.append(f"  {fam:10s} {len(rows):3d} " + " ".join(f"{v:8.1f}" for v in a[rows].mean(0)))
        out.append(f"  {'all':10s} {len(keys):3d} " + " ".join(f"{v:8.1f}" for v in a.mean(0)) + f"   oracle {a.max(1).mean():.1f}")
        seeds = {len(v) for k in keys for v in per_seed[k].values()}
        if min(seeds) >= 2:
            # the oracle without its seed noise: pick each task's candidate on one fine-tune seed, score
            # it on another (the dev images are the same, so dev-sample luck is not removed)
            two = np.array([[per_seed[k][c][:2] for c in candidates] for k in keys])  # tasks x candidates x 2
            tasks = np.arange(len(keys))
            split = np.mean([two[tasks, two[:, :, i].argmax(1), 1 - i].mean() for i in (0, 1)])
            out.append(f"  per-task choice on one seed, scored on the other: {split:.2f} (best single {a.mean(0).max():.2f}); "
                       f"median |seed 0 - seed 1| of a cell {np.median(np.abs(two[:, :, 0] - two[:, :, 1])):.2f}")
        e = np.stack([embedding[n] for n in names])
        e = (e - e.mean(0)) / (e.std(0) + 1e-8)
        for held_out, group in (("family", _family), ("class subset", _class_subset)):
            single, nearest = [], []
            for i, n in enumerate(names):
                others = [j for j, m in enumerate(names) if group(m) != group(n)]
                single.append(a[i, a[others].mean(0).argmax()])
                close = [others[j] for j in np.argsort(((e[others] - e[i]) ** 2).sum(1))[:neighbours]]
                nearest.append(a[i, (a[close] - a[close].mean(1, keepdims=True)).mean(0).argmax()])
            gain = np.array(nearest) - np.array(single)
            half = 1.96 * gain.std(ddof=1) / math.sqrt(len(gain)) if len(gain) > 1 else float("nan")
            out.append(f"  leave-one-{held_out.replace(' ', '-')}-out: best single {np.mean(single):.2f}, {neighbours} nearest "
                       f"in embedding {np.mean(nearest):.2f}, gain {gain.mean():+.2f} [{gain.mean() - half:+.2f}, {gain.mean() + half:+.2f}]")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyze", nargs="+", metavar="JSONL", help="print the analysis of these rows and exit")
    ap.add_argument("--pruner", help="a saved pruner directory or models:/ URI")
    ap.add_argument("--catalog", default=".stamp/suite64/catalog.json")
    ap.add_argument("--datasets", nargs="+", help="source dataset names in the catalog, or load_source specs "
                    "(e.g. digits: a target's dev split, for comparison; --analyze pools every row it reads)")
    ap.add_argument("--candidates", nargs="+", default=["l1", "uniform", "mix0.5", "stamp"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tune seeds")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--dev-per-class", type=int, default=100)
    ap.add_argument("--sample-per-class", type=int, default=20, help="the set encoder's sample")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="append one JSON line per cell here")
    args = ap.parse_args()
    if args.analyze:
        print(analyze(args.analyze))
        return
    if not (args.pruner and args.datasets and args.out):
        ap.error("--pruner, --datasets and --out are required unless --analyze is given")
    for cand in args.candidates:  # fail before any fine-tune on a misspelt candidate
        if not _CANDIDATE.match(cand):
            ap.error(f"unknown candidate {cand!r}: expected l1, uniform, stamp, mixW or tiltB")
    run(args)


if __name__ == "__main__":
    main()
