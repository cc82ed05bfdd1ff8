"""Experiment: how much room is there for a task-adaptive mask? Headroom before method (issue 24, item 4).

For every task (a benchmark target's *dev* split, held out of its training split, or a source dataset of
a catalog) and budget, a grid of masks is scored through the deployed prune path (physical pruning,
BatchNorm recalibration, prototype head, fine-tune) on the same weights. Mask names are
bench_allocation's: an *allocation* (``l1``, ``uniform``, ``mixW``, ``tiltB``, ``stamp``) with L1 ranking
inside layers, or ``<ranking>_in_<allocation>`` (rankings ``l1``, ``activation``, ``separability``,
``snip``, ``grasp``, ``synflow``, ``random``, ``stamp``).

``--analyze`` prints, per task kind (targets, sources) and budget, for three families of masks
(allocations with L1 ranking; rankings inside L1's allocation; all):

* the best *shared* mask (highest mean over the tasks) and each task's own best;
* the headroom with seed noise removed: each task's mask and the shared one are both chosen on one
  fine-tune seed and scored on the other (both directions averaged): what a per-task choice could win
  over one mask for all, if it were known;
* whether the task's sample predicts its winner (sources): leave-one-class-subset-out, the best single
  mask of the other tasks against the best mask of the 5 nearest other tasks in a feature space of the
  sample seen through the backbone (``pooled``: mean penultimate features; ``channels``: per-channel
  mean response and class separability of every prunable group), with a paired 95% interval.

Needs only a backbone (``--backbone``: a pretrain run or checkpoint directory, or models:/ URI of a
registered backbone) or a pruner (``--pruner``; its ``stamp`` masks become available). Rows are appended
to ``--out`` as they finish; a re-run skips cells already there (same task, budget, mask and seeds).

Run from the repository root (targets from jobs/configs/benchmark_natural.yaml; dev splits only):
    .venv/bin/python -m tests.benchmarks.bench_headroom --backbone .stamp/ray_results/pretrain-tin-resnet20 \\
        --tasks "npz:../shared/datasets/cifar10.npz" digits --budgets 0.5 0.3 0.1 --seeds 0 1 --out rows.jsonl
    .venv/bin/python -m tests.benchmarks.bench_headroom --analyze rows.jsonl
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.apps.benchmark import dev_split
from pipeline.apps.prune import load_catalog_dataset, resolve_data
from pipeline.config.benchmark import BenchBBDSection
from pipeline.data import ArrayDataset, Catalog
from pipeline.registry import load_pruner
from pipeline.registry.backbones import load_backbone
from stamp_core import PruneSpec, StampPruner, default_finetune, init_classifier_from_prototypes, prepare_images, prune_and_finetune
from stamp_core.baselines import BBDConfig, ScoringInput, spec_by_criterion
from stamp_core.channel_generator import channel_statistics
from tests.benchmarks.bench_allocation import mask_builders, parse_mask
from tests.benchmarks.bench_source_allocation import _class_subset

ALLOCATION_MASKS = ("l1", "uniform", "mix0.5", "tilt-1", "tilt+1")
RANKING_MASKS = ("snip_in_l1", "synflow_in_l1", "activation_in_l1", "separability_in_l1", "random_in_l1")
DEFAULT_MASKS = ALLOCATION_MASKS + RANKING_MASKS
FAMILIES = ("allocation", "ranking", "all")
#: Beta-Bernoulli dropout trained on the task (benchmark_natural.yaml's settings): its mask on the backbone's own
#: weights (``bbd``), or on the weights BBD trained with it (``bbd_trained``, the benchmark's BBD): whether BBD's
#: lead comes from where it puts the budget or from its extra epochs on the task
BBD_MASKS = ("bbd", "bbd_trained")


def load_subject(pruner: str | None, backbone: str | None, image_size: int = 32) -> StampPruner:
    """The pruner to score masks with; from a bare backbone, an untrained one (its scores start at L1)."""
    if pruner:
        return load_pruner(pruner).eval()
    net = load_backbone(str(backbone))  # models:/ URI, a backbones/ entry name, or a run / checkpoint directory
    torch.manual_seed(0)
    return StampPruner.create(net, image_size=image_size, score_init="l1").eval()


def load_task(name: str, catalog: str | None, catalogued: set[str], dev_per_class: int) -> ArrayDataset:
    """A task with its dev split as ``x_test``: a dataset of ``catalog`` (one of ``catalogued``) by name, or a
    load_source spec (a target)."""
    data = load_catalog_dataset(catalog, name) if catalog and name in catalogued else resolve_data(name)
    # Few-shot tasks (Omniglot: 16 drawings per character) keep three quarters of each class for training.
    smallest = int(np.bincount(data.y_train).min())
    return dev_split(data, max(1, min(dev_per_class, smallest // 4)))


def task_features(pruner: StampPruner, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    """What the backbone sees of a task's sample: the candidate inputs of a task-adaptive predictor."""
    with torch.no_grad():
        feats, responses = pruner.extract_features(x, channel_responses=True)
    stats = channel_statistics(responses, y)
    channels = torch.cat([torch.cat([s[:, 0], s[:, 2]]) for s in stats])  # log mean response, separability
    return {"pooled": feats.mean(0).tolist(), "channels": channels.tolist()}


def _done(path: str | None) -> set[tuple[str, float, str, tuple[int, ...]]]:
    if not path or not Path(path).exists():
        return set()
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {(r["task"], r["r"], r["mask"], tuple(r["seeds"])) for r in rows if r.get("type") == "cell"}


def _append(path: str | None, row: dict[str, Any]) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.catalog and args.catalog.startswith("s3://"):
        from pipeline.settings import get_settings, load_stack_credentials

        load_stack_credentials(get_settings().state_dir)  # the embedded stack's S3, unless the environment names one
    pruner = load_subject(args.pruner, args.backbone)
    size = pruner.config.image_size
    done = _done(args.out)
    catalogued = set(Catalog.load(args.catalog).names()) if args.catalog else set()
    for name in args.tasks:
        kind = "source" if name in catalogued else "target"
        ds = load_task(name, args.catalog, catalogued, args.dev_per_class)
        keep = np.concatenate([np.flatnonzero(ds.y_train == c)[: args.train_per_class] for c in np.unique(ds.y_train)])
        x, y = prepare_images(ds.x_train[keep], size), torch.as_tensor(ds.y_train[keep]).long()
        x_dev, y_dev = prepare_images(ds.x_test, size), torch.as_tensor(ds.y_test).long()
        sample = torch.cat([torch.nonzero(y == c).flatten()[: args.sample_per_class] for c in y.unique()])
        _append(args.out, {"type": "task", "task": name, "kind": kind, "train": len(y), "dev": len(y_dev),
                           "classes": int(len(y.unique())), "features": task_features(pruner, x[sample], y[sample])})
        build = mask_builders(pruner, x, y, sample_per_class=args.sample_per_class)
        bbd_runs: dict[tuple[float, int], tuple[PruneSpec, torch.nn.Module]] = {}
        for r in args.budgets:
            for mask in args.masks:
                if (name, r, mask, tuple(args.seeds)) in done:
                    continue
                t0 = time.perf_counter()
                accs = []
                for s in args.seeds:
                    if mask in BBD_MASKS:
                        if (r, s) not in bbd_runs:
                            bbd_runs[(r, s)] = _train_bbd(pruner, x, y, r, s, args.bbd_epochs, args.bbd_batch)
                        spec, trained = bbd_runs[(r, s)]
                        weights = trained if mask == "bbd_trained" else pruner.backbone
                    else:
                        spec, weights = build(mask, r), pruner.backbone
                    accs.append(prune_and_finetune(weights, spec, x, y, x_dev, y_dev, default_finetune(args.epochs, s)).accuracy)
                row = {"type": "cell", "task": name, "kind": kind, "r": r, "mask": mask, "seeds": list(args.seeds),
                       "per_seed": accs, "accuracy": float(np.mean(accs)), "kept_per_group": [len(k) for k in spec.kept.values()],
                       "macs_ratio": spec.macs_pruned / spec.macs_full, "seconds": round(time.perf_counter() - t0, 1)}
                print(json.dumps({k: v for k, v in row.items() if k != "kept_per_group"}), flush=True)
                _append(args.out, row)


def _train_bbd(pruner: StampPruner, x: torch.Tensor, y: torch.Tensor, r: float, seed: int, epochs: int, batch: int
               ) -> tuple[PruneSpec, torch.nn.Module]:
    """BBD's mask at budget ``r`` and the copy of the backbone it trained, as the benchmark's BBD cell makes them."""
    model = copy.deepcopy(pruner.backbone)
    model.reset_classifier(int(y.max()) + 1)
    init_classifier_from_prototypes(model, x, y)
    b = BenchBBDSection(epochs=epochs, batch_size=batch)  # the benchmark's own defaults for everything else
    inp = ScoringInput(model, pruner.structure, x, y, r, seed=seed,
                       bbd=BBDConfig(epochs=b.epochs, batch_size=b.batch_size, lr=b.lr, gate_lr=b.gate_lr,
                                     kl_weight=b.kl_weight, macs_weight=b.macs_weight))
    return spec_by_criterion("bbd", inp, model.config), model


# ----------------------------------------------------------------------------------------------- analysis


def in_family(mask: str, family: str) -> bool:
    """Allocations keep L1's ranking; rankings keep L1's allocation; ``all`` takes every mask (BBD's, trained on
    the task, in none: they are not masks a one-pass pruner could choose)."""
    if mask in BBD_MASKS:
        return False
    allocation, ranking = parse_mask(mask)
    if family == "allocation":
        return ranking in (None, "l1") and allocation not in ("stamp", "stamp_mean")
    if family == "ranking":
        return allocation == "l1"
    return True


def seed_split_headroom(acc: np.ndarray) -> tuple[float, np.ndarray]:
    """``acc`` is tasks x masks x 2 seeds. Per task: its own mask chosen on one seed minus the shared mask
    chosen on the same seed (mean over tasks), both scored on the other seed; averaged over the two
    directions. Returns the shared mask's score and each task's headroom (points)."""
    tasks = np.arange(acc.shape[0])
    shared_score, gains = [], []
    for i in (0, 1):
        pick, score = acc[:, :, i], acc[:, :, 1 - i]
        shared = pick.mean(0).argmax()
        shared_score.append(score[:, shared].mean())
        gains.append(score[tasks, pick.argmax(1)] - score[:, shared])
    return float(np.mean(shared_score)), np.mean(gains, axis=0)


def predictor_gain(acc: np.ndarray, features: np.ndarray, groups: Sequence[str], neighbours: int = 5) -> np.ndarray:
    """Per task: accuracy of the best mask of its ``neighbours`` nearest other tasks (in ``features``)
    minus that of the best mask of all other tasks; tasks of the same group are never neighbours."""
    f = (features - features.mean(0)) / (features.std(0) + 1e-8)
    gains = []
    for i, g in enumerate(groups):
        others = [j for j, h in enumerate(groups) if h != g]
        single = acc[i, acc[others].mean(0).argmax()]
        close = [others[j] for j in np.argsort(((f[others] - f[i]) ** 2).sum(1))[:neighbours]]
        nearest = acc[i, (acc[close] - acc[close].mean(1, keepdims=True)).mean(0).argmax()]
        gains.append(nearest - single)
    return np.array(gains)


def _interval(v: np.ndarray) -> str:
    if len(v) < 2:
        return f"{v.mean():+.2f}"
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v))
    return f"{v.mean():+.2f} [{v.mean() - half:+.2f}, {v.mean() + half:+.2f}]"


def _short(task: str) -> str:
    """``npz:../shared/datasets/cifar10.npz?classes=6,7`` -> ``cifar10?classes=6,7``."""
    return task.rsplit("/", 1)[-1].replace(".npz", "") if task.startswith("npz:") else task


def analyze(paths: Sequence[str], neighbours: int = 5) -> str:
    """Markdown tables of the headroom described in the module docstring."""
    cells: dict[tuple[str, float], dict[str, list[float]]] = collections.defaultdict(dict)
    kind_of: dict[str, str] = {}
    features: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        for line in open(path):
            row = json.loads(line)
            kind_of[row["task"]] = row["kind"]
            if row["type"] == "task":
                features[row["task"]] = row["features"]
            else:
                cells[(row["task"], row["r"])][row["mask"]] = [100 * a for a in row["per_seed"]]
    out: list[str] = []
    for kind in ("target", "source"):
        for r in sorted({k[1] for k in cells}, reverse=True):
            keys = sorted(k for k in cells if k[1] == r and kind_of[k[0]] == kind)
            if not keys:
                continue
            common = sorted(set().union(*(set(cells[k]) for k in keys)))
            short = [k for k in keys if not set(cells[k]) >= set(common)]  # a study still running leaves some short
            keys = [k for k in keys if k not in short]
            if not keys:
                continue
            out += [f"### {kind}s, r={r}: {len(keys)} tasks, {len(common)} masks"
                    + (f" ({len(short)} tasks without every mask left out)" if short else ""), "",
                    "| family | best shared | its mean | per-task best (in-sample) | headroom, seed noise removed | tasks with headroom >= 1 |",
                    "|---|---|---:|---:|---|---:|"]
            per_task: dict[str, np.ndarray] = {}
            for family in FAMILIES:
                masks = [m for m in common if in_family(m, family)]
                if len(masks) < 2:
                    continue
                acc = np.array([[cells[k][m][:2] for m in masks] for k in keys])  # tasks x masks x seeds
                mean = acc.mean(2)
                best = masks[int(mean.mean(0).argmax())]
                _, gains = seed_split_headroom(acc) if acc.shape[2] >= 2 else (0.0, np.zeros(len(keys)))
                per_task[family] = gains
                out.append(f"| {family} | `{best}` | {mean.mean(0).max():.1f} | {mean.max(1).mean():.1f} | "
                           f"{_interval(gains)} | {(gains >= 1).sum()}/{len(keys)} |")
                if kind == "source" and len(keys) >= 2 * neighbours and all(k[0] in features for k in keys):
                    groups = [_class_subset(k[0]) for k in keys]
                    for space in ("pooled", "channels"):
                        fx = np.array([features[k[0]][space] for k in keys])
                        gain = predictor_gain(mean, fx, groups, neighbours)
                        out.append(f"| {family}: {neighbours} nearest in `{space}` vs best single (leave class subset out) | | | | "
                                   f"{_interval(gain)} | |")
            out.append("")
            if kind == "target":
                masks = [m for m in common if in_family(m, "all")]
                acc = np.array([[np.mean(cells[k][m]) for m in masks] for k in keys])
                out += ["| target | " + " | ".join(f"`{m}`" for m in masks) + " | own best | headroom (alloc / rank / all) |",
                        "|---|" + "---:|" * (len(masks) + 2)]
                for i, k in enumerate(keys):
                    room = " / ".join(f"{per_task[f][i]:+.1f}" if f in per_task else "-" for f in FAMILIES)
                    out.append(f"| {_short(k[0])} | " + " | ".join(f"{v:.1f}" for v in acc[i]) +
                               f" | `{masks[int(acc[i].argmax())]}` | {room} |")
                out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyze", nargs="+", metavar="JSONL", help="print the analysis of these rows and exit")
    ap.add_argument("--backbone", help="a models:/ URI of a registered backbone, a backbones/ entry name, or a pretrain run/checkpoint directory")
    ap.add_argument("--pruner", help="a saved pruner directory or models:/ URI (instead of --backbone)")
    ap.add_argument("--catalog", help="catalog.json of the source datasets named in --tasks")
    ap.add_argument("--tasks", nargs="+", help="catalog dataset names (sources) or load_source specs (targets: dev split)")
    ap.add_argument("--masks", nargs="+", default=list(DEFAULT_MASKS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tune seeds (2 for the seed-split headroom)")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--dev-per-class", type=int, default=100, help="at most a quarter of the smallest class")
    ap.add_argument("--sample-per-class", type=int, default=20, help="the set encoder's and the statistics' sample")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--bbd-epochs", type=int, default=2, help="BBD's training epochs for the bbd masks (benchmark_natural.yaml's)")
    ap.add_argument("--bbd-batch", type=int, default=128, help="BBD's batch size (benchmark_natural.yaml's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="append one JSON line per task and per cell here (and skip cells already there)")
    args = ap.parse_args()
    if args.analyze:
        print(analyze(args.analyze))
        return
    if not args.tasks or bool(args.pruner) == bool(args.backbone):
        ap.error("give --tasks and exactly one of --backbone or --pruner (or --analyze)")
    for name in args.masks:  # refuse a misspelt mask before any fine-tune
        try:
            if name not in BBD_MASKS:
                parse_mask(name)
        except ValueError as exc:
            ap.error(str(exc))
    run(args)


if __name__ == "__main__":
    main()
