"""Experiment: does what one forward pass sees of a task predict which candidate mask does best after the
deployed fine-tune? Read from the outcome table (``python jobs/outcomes.py``, issue 25 item 2).

For every budget of the table and every held-out group of tasks (leave-one-*family*-out: tin, mnist, fashion,
stripes, blobs, shapes, textures; or leave-one-*class-subset*-out: every domain variant of one class subset held
out together), a chooser is fitted on the other groups and picks one candidate per held-out task; its score is
the accuracy that candidate actually reached there. Choosers:

* ``shared``: the candidate best on average over the training tasks at that budget (no adaptivity);
* ``ridge(l)``: :class:`stamp_core.outcome_predictor.OutcomePredictor` with penalty ``l`` on the feature terms
  (all budgets in one fit, so it also interpolates between them); ``ridge(cv)`` picks ``l`` by an inner
  leave-one-group-out over the training groups only;
* ``knn5``: the candidate best on average over the 5 nearest training tasks in standardised features;
* ``oracle``: each task's own best (in-sample: inflated by fine-tune noise; an upper bound).

Printed per budget: mean accuracy of each chooser and its paired difference to ``shared`` with a 95% t
interval over the held-out tasks; then, per family, each candidate's mean accuracy; then each feature's
correlation with the advantage of uniform width, deep tilt and separability ranking over L1's mask.

Run from the repository root (the table of jobs/configs/outcomes_natural.yaml on the local stack):
    .venv/bin/python -m tests.benchmarks.bench_outcomes s3://stamp/outcomes/outcomes-natural [--holdout family]
"""

from __future__ import annotations

import argparse
import collections
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.settings import get_settings, load_stack_credentials
from pipeline.training.outcomes import load_outcome_table
from stamp_core.candidates import FEATURE_NAMES
from stamp_core.outcome_predictor import OutcomePredictor

RIDGES = (0.3, 3.0, 30.0)


def family(dataset: str) -> str:
    """``tin-c1-2-gray`` -> ``tin``; ``mnist-c0-1-inv`` -> ``mnist``."""
    return dataset.split("-")[0]


def class_subset(dataset: str) -> str:
    """Every domain variant of one class subset maps to one name (``tin-c1-2-3``)."""
    found = re.match(r"^([a-z0-9]+)(-c\d+(?:-\d+)*)?", dataset)
    return found.group(0) if found and found.group(2) else family(dataset) + "-all"


class Table:
    """The table as arrays: per (task, budget) observation the features and each candidate's accuracy."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        cands = collections.Counter(row["candidate"] for rec in records for row in rec["rows"])
        self.candidates = sorted(cands, key=lambda c: (-cands[c], c))
        feats, budgets, accs, tasks, ids = [], [], [], [], []
        for rec in records:
            cells: dict[float, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
            for row in rec["rows"]:
                cells[row["r"]][row["candidate"]].append(100.0 * row["accuracy"])
            for r, by in sorted(cells.items()):
                if set(by) != set(self.candidates):
                    continue  # a task scored with another candidate list
                feats.append([rec["features"][k] for k in FEATURE_NAMES])
                budgets.append(r)
                accs.append([float(np.mean(by[c])) for c in self.candidates])
                tasks.append(rec["dataset"])
                ids.append(rec["task_id"])
        self.features = torch.tensor(feats, dtype=torch.float64)
        self.r = torch.tensor(budgets, dtype=torch.float64)
        self.acc = torch.tensor(accs, dtype=torch.float64)
        self.dataset = tasks
        self.task_id = ids

    def relative(self, index: np.ndarray) -> torch.Tensor:
        a = self.acc[index]
        return a - a.mean(1, keepdim=True)


Chooser = Callable[[Table, np.ndarray, np.ndarray], np.ndarray]


def _shared(t: Table, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    out = np.empty(len(test), dtype=int)
    for i, j in enumerate(test):
        same = train[t.r[train].numpy() == float(t.r[j])]
        out[i] = int(t.relative(same).mean(0).argmax())
    return out


def _ridge(penalty: float) -> Chooser:
    def choose(t: Table, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = OutcomePredictor.fit(t.features[train], t.r[train], t.relative(train), t.candidates, FEATURE_NAMES, penalty)
        return model(t.features[test], t.r[test]).argmax(1).numpy()
    return choose


def _ridge_cv(groups: np.ndarray) -> Chooser:
    def choose(t: Table, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        best = max(RIDGES, key=lambda p: _cv_score(t, train, groups, _ridge(p)))
        return _ridge(best)(t, train, test)
    return choose


def _knn(k: int) -> Chooser:
    def choose(t: Table, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        mean, scale = t.features[train].mean(0), t.features[train].std(0).clamp_min(1e-6)
        out = np.empty(len(test), dtype=int)
        for i, j in enumerate(test):
            same = train[t.r[train].numpy() == float(t.r[j])]
            d = (((t.features[same] - t.features[j]) / scale) ** 2).sum(1)
            near = same[torch.argsort(d)[:k].numpy()]
            out[i] = int(t.relative(near).mean(0).argmax())
        return out
    return choose


def _cv_score(t: Table, index: np.ndarray, groups: np.ndarray, chooser: Chooser) -> float:
    """Mean accuracy of ``chooser`` over leave-one-group-out folds inside ``index``."""
    total, n = 0.0, 0
    for g in np.unique(groups[index]):
        test, train = index[groups[index] == g], index[groups[index] != g]
        if len(train) < 2:
            continue
        picked = chooser(t, train, test)
        total += float(t.acc[test, picked].sum())
        n += len(test)
    return total / max(n, 1)


def evaluate(t: Table, holdout: str) -> str:
    group_of = family if holdout == "family" else class_subset
    groups = np.array([group_of(d) for d in t.dataset])
    choosers: dict[str, Chooser] = {"shared": _shared, **{f"ridge({p:g})": _ridge(p) for p in RIDGES},
                                    "ridge(cv)": _ridge_cv(groups), "knn5": _knn(5)}
    picked = {name: np.empty(len(t.r), dtype=int) for name in choosers}
    everything = np.arange(len(t.r))
    for g in np.unique(groups):
        test, train = everything[groups == g], everything[groups != g]
        for name, chooser in choosers.items():
            picked[name][test] = chooser(t, train, test)
    lines = [f"holdout: one {holdout} at a time ({len(np.unique(groups))} groups, {len(set(t.task_id))} tasks, "
             f"{len(t.candidates)} candidates)", "",
             "| r | tasks | " + " | ".join(choosers) + " | oracle |", "|---|---:|" + "---:|" * (len(choosers) + 1)]
    diffs = []
    for r in sorted(set(t.r.tolist())):
        at = everything[t.r.numpy() == r]
        got = {name: t.acc[at, picked[name][at]].numpy() for name in choosers}
        lines.append(f"| {r:g} | {len(at)} | " + " | ".join(f"{v.mean():.1f}" for v in got.values())
                     + f" | {t.acc[at].max(1).values.mean():.1f} |")
        diffs.append(f"| {r:g} | " + " | ".join(_interval(got[n] - got["shared"]) for n in choosers if n != "shared") + " |")
    lines += ["", "paired difference to `shared`, 95% t interval over held-out tasks:", "",
              "| r | " + " | ".join(n for n in choosers if n != "shared") + " |",
              "|---|" + "---|" * (len(choosers) - 1), *diffs]
    return "\n".join(lines)


def _interval(d: np.ndarray) -> str:
    if len(d) < 2:
        return f"{d.mean():+.2f}"
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]"


def per_family(t: Table) -> str:
    fams = sorted({family(d) for d in t.dataset})
    lines = []
    for r in sorted(set(t.r.tolist())):
        at = np.flatnonzero(t.r.numpy() == r)
        lines += [f"r={r:g}: mean dev accuracy % per family (best in bold)", "",
                  "| candidate | " + " | ".join(fams) + " |", "|---|" + "---:|" * len(fams)]
        means = {f: t.acc[[i for i in at if family(t.dataset[i]) == f]].mean(0) for f in fams}
        for k, c in enumerate(t.candidates):
            cells = []
            for f in fams:
                v = float(means[f][k])
                cells.append(f"**{v:.1f}**" if v == float(means[f].max()) else f"{v:.1f}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def correlations(t: Table) -> str:
    contrasts = [(a, "l1") for a in ("uniform", "tilt+1", "separability_in_l1") if a in t.candidates and "l1" in t.candidates]
    lines = ["correlation of each feature with a candidate's advantage over `l1` (all budgets):", "",
             "| feature | " + " | ".join(f"{a} - {b}" for a, b in contrasts) + " |", "|---|" + "---:|" * len(contrasts)]
    for k, name in enumerate(FEATURE_NAMES):
        cells = []
        for a, b in contrasts:
            adv = (t.acc[:, t.candidates.index(a)] - t.acc[:, t.candidates.index(b)]).numpy()
            x = t.features[:, k].numpy()
            cells.append(f"{np.corrcoef(x, adv)[0, 1]:+.2f}" if x.std() > 0 and adv.std() > 0 else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", help="a run location (s3://.../outcomes/NAME or a directory) or a table.jsonl")
    ap.add_argument("--holdout", choices=("family", "class_subset", "both"), default="both")
    args = ap.parse_args()
    load_stack_credentials(get_settings().state_dir)
    t = Table(load_outcome_table(args.table))
    for holdout in ("family", "class_subset") if args.holdout == "both" else (args.holdout,):
        print(evaluate(t, holdout), end="\n\n")
    print(per_family(t))
    print(correlations(t))


if __name__ == "__main__":
    main()
