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
import math

import numpy as np

from pipeline.settings import get_settings, load_stack_credentials
from pipeline.training.outcome_fit import (
    Chooser,
    Observations,
    choose_knn,
    choose_ridge,
    choose_ridge_cv,
    choose_shared,
    cross_validate,
    realized,
)
from pipeline.training.outcomes import load_outcome_table, task_family
from stamp_core.candidates import FEATURE_NAMES

RIDGES = (0.3, 3.0, 30.0)


def evaluate(t: Observations, holdout: str) -> str:
    groups = t.groups(holdout)
    choosers: dict[str, Chooser] = {"shared": choose_shared, **{f"ridge({p:g})": choose_ridge(p) for p in RIDGES},
                                    "ridge(cv)": choose_ridge_cv(RIDGES, groups), "knn5": choose_knn(5)}
    picked = {name: cross_validate(t, groups, chooser) for name, chooser in choosers.items()}
    everything = np.arange(len(t))
    lines = [f"holdout: one {holdout} at a time ({len(np.unique(groups))} groups, {len(set(t.task_id))} tasks, "
             f"{len(t.candidates)} candidates)", "",
             "| r | tasks | " + " | ".join(choosers) + " | oracle |", "|---|---:|" + "---:|" * (len(choosers) + 1)]
    diffs = []
    for r in sorted(set(t.r.tolist())):
        at = everything[t.r.numpy() == r]
        got = {name: realized(t, picked[name])[at] for name in choosers}
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


def per_family(t: Observations) -> str:
    fams = sorted({task_family(d) for d in t.dataset})
    lines = []
    for r in sorted(set(t.r.tolist())):
        at = np.flatnonzero(t.r.numpy() == r)
        lines += [f"r={r:g}: mean dev accuracy % per family (best in bold)", "",
                  "| candidate | " + " | ".join(fams) + " |", "|---|" + "---:|" * len(fams)]
        means = {f: t.acc[[i for i in at if task_family(t.dataset[i]) == f]].mean(0) for f in fams}
        for k, c in enumerate(t.candidates):
            cells = []
            for f in fams:
                v = float(means[f][k])
                cells.append(f"**{v:.1f}**" if v == float(means[f].max()) else f"{v:.1f}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def correlations(t: Observations) -> str:
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
    t = Observations(load_outcome_table(args.table))
    for holdout in ("family", "class_subset") if args.holdout == "both" else (args.holdout,):
        print(evaluate(t, holdout), end="\n\n")
    print(per_family(t))
    print(correlations(t))


if __name__ == "__main__":
    main()
