"""The benchmark's report: ``results.md`` (the tables below), two plots and the MLflow run.

Tables, each at the headline fine-tune length unless said otherwise:

1. *Mask quality*: every mask method on the same weights (one table per weight set).
2. *Paired differences*: STAMP - each baseline per seed, mean and 95% t interval; bold = significant.
3. *Weights*: meta-trained - pretrained weights under the same mask method (where a win comes from).
4. *Adaptivity*: a target's own STAMP mask vs the masks STAMP generated for the other targets vs
   the mean-embedding mask, on the same weights and fine-tune; Jaccard distances between the masks.
5. *Accuracy vs fine-tune epochs*: complete fine-tunes of the same pruned start (0 = prototype head).
6. *Cost-matched ranking*: the best accuracy each method reaches within the wall time STAMP needs
   for each point of its curve (time from data in hand: mask + build + fine-tune), next to the
   equal-epochs ranking.
7. All cells: mean ± std of accuracy, MACs, parameters, latency and times.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.config import BenchmarkConfig
from stamp_core.baselines import get_criterion, list_criteria

from pipeline.apps.benchmark.cells import CROSS_PREFIX, MASKS_JSONL, jaccard_distance, read_masks, row_id
from pipeline.apps.benchmark.stats import PairedDifference, paired_difference

RESULTS_MD = "results.md"
ACCURACY_PNG = "accuracy_vs_macs.png"
TIME_PNG = "time_vs_accuracy.png"

_FIXED_LABELS = {"full": "full network", "stamp": "STAMP", "stamp_mean": "STAMP (mean embedding)"}
_WEIGHT_LABELS = {"meta": "meta-trained weights (the pruner's backbone)", "pretrained": "pretrained weights"}
_METRICS = ("accuracy", "macs_ratio", "params", "latency_b1_ms", "latency_b64_ms", "mask_seconds",
            "method_train_seconds", "build_seconds", "finetune_seconds", "total_seconds")


def method_label(method: str) -> str:
    if method in _FIXED_LABELS:
        return _FIXED_LABELS[method]
    if method.startswith(CROSS_PREFIX):
        return f"STAMP, mask for {method[len(CROSS_PREFIX):]}"
    try:
        return get_criterion(method).label
    except ValueError:
        return method


def _method_order(method: str) -> tuple[int, int, str]:
    """full, the criteria in registry order, STAMP, its ablations."""
    if method == "full":
        return (0, 0, "")
    if method == "stamp":
        return (2, 0, "")
    if method.startswith("stamp"):
        return (3, 0, method)
    criteria = list_criteria()
    return (1, criteria.index(method), "") if method in criteria else (1, len(criteria), method)


def _ok(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and r.get("accuracy") is not None]


def _blocks(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(weights, target, backbone) in a stable order: meta first."""
    keys = {(r["weights"], r["target"], r["backbone"]) for r in rows}
    return sorted(keys, key=lambda k: (k[0] != "meta", k[1], k[2]))


def _budgets(rows: list[dict[str, Any]]) -> list[float]:
    return sorted({float(r["macs_ratio_target"]) for r in rows if r["method"] != "full"}, reverse=True)


def _by_seed(rows: list[dict[str, Any]], key: str = "accuracy") -> dict[tuple[str, str, str, str, float], dict[int, float]]:
    """{(weights, target, backbone, method, budget): {seed: value}} over ok rows."""
    out: dict[tuple[str, str, str, str, float], dict[int, float]] = defaultdict(dict)
    for r in _ok(rows):
        out[(r["weights"], r["target"], r["backbone"], r["method"], float(r["macs_ratio_target"]))][int(r["seed"])] = float(r[key])
    return out


def _pm(values: Iterable[float], scale: float = 100.0) -> str:
    v = list(values)
    if not v:
        return "–"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{scale * statistics.fmean(v):.1f} ± {scale * sd:.1f}"


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of each (target, backbone, weights, method, budget); ok rows only."""
    groups: dict[tuple[str, str, str, str, float], list[dict[str, Any]]] = defaultdict(list)
    counts: dict[tuple[str, str, str, str, float], int] = defaultdict(int)
    order: list[tuple[str, str, str, str, float]] = []
    for row in rows:
        key = (row["target"], row["backbone"], row["weights"], row["method"], float(row["macs_ratio_target"]))
        if key not in counts:
            order.append(key)
        counts[key] += 1
        if row["status"] == "ok":
            groups[key].append(row)
    out = []
    for key in order:
        ok = groups.get(key, [])
        agg: dict[str, Any] = {"target": key[0], "backbone": key[1], "weights": key[2], "method": key[3], "budget": key[4],
                               "n_ok": len(ok), "n": counts[key]}
        for metric in _METRICS:
            vals = [float(r[metric]) for r in ok if r.get(metric) is not None]
            agg[metric] = statistics.fmean(vals) if vals else math.nan
            agg[f"{metric}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else math.nan
        out.append(agg)
    return out


# ----------------------------------------------------------------------------- tables


def _mask_quality(rows: list[dict[str, Any]]) -> list[str]:
    acc = _by_seed(rows)
    lines: list[str] = []
    for weights in sorted({r["weights"] for r in rows}, key=lambda w: w != "meta"):
        mine = [r for r in rows if r["weights"] == weights]
        cols = [(t, b, r) for (_, t, b) in _blocks(mine) for r in _budgets(mine)]
        methods = sorted({r["method"] for r in mine if not r["method"].startswith(CROSS_PREFIX)}, key=_method_order)
        lines += [f"### On {_WEIGHT_LABELS.get(weights, weights)}", "",
                  "| method | " + " | ".join(f"{t} / {b} r={r:g}" for t, b, r in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for m in methods:
            cells = []
            for t, b, r in cols:
                v = acc.get((weights, t, b, m, 1.0 if m == "full" else r), {})
                cells.append(_pm(v.values()) if v else "–")
            lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def paired_table(rows: list[dict[str, Any]], method: str = "stamp") -> list[tuple[str, str, str, float, str, PairedDifference]]:
    """(weights, target, backbone, budget, other method, ``method`` - other) for every other method with shared seeds."""
    acc = _by_seed(rows)
    out = []
    for (weights, target, backbone, m, budget), mine in sorted(acc.items()):
        if m != method:
            continue
        for (w2, t2, b2, other, r2), theirs in sorted(acc.items(), key=lambda kv: _method_order(kv[0][3])):
            if (w2, t2, b2, r2) != (weights, target, backbone, budget) or other == method or other.startswith(CROSS_PREFIX):
                continue
            d = paired_difference(mine, theirs)
            if d is not None:
                out.append((weights, target, backbone, budget, other, d))
    return out


#: the pseudo-method of :func:`target_means`: per target, whichever of L1 and uniform width has the higher mean
BETTER_OF_L1_UNIFORM = "better of L1 / uniform"


def target_means(rows: list[dict[str, Any]], method: str = "stamp"
                 ) -> list[tuple[str, str, float, str, dict[int, float], PairedDifference | None]]:
    """The mean over targets, per seed, of each method at each budget, and ``method`` minus it paired over seeds.

    Returns (weights, backbone, budget, other method, {seed: mean over the targets}, ``method`` - other). A seed
    counts only where the method has every target of the block (a partial grid never averages different targets).
    The row ``BETTER_OF_L1_UNIFORM`` takes, per target, whichever of L1 and uniform width has the higher mean over
    the seeds both have: chosen on the scored data, so it flatters the baseline.
    """
    acc = _by_seed(rows)
    out = []
    for weights, backbone in sorted({(w, b) for (w, _, b, _, _) in acc}, key=lambda k: (k[0] != "meta", k[1])):
        targets = sorted({t for (w, t, b, _, _) in acc if (w, b) == (weights, backbone)})
        for budget in _budgets([r for r in _ok(rows) if (r["weights"], r["backbone"]) == (weights, backbone)]):
            per_target = {m: {t: acc.get((weights, t, backbone, m, budget), {}) for t in targets}
                          for (w, _, b, m, r) in acc if (w, b, r) == (weights, backbone, budget)
                          and not m.startswith(CROSS_PREFIX)}
            if "l1" in per_target and "uniform" in per_target:
                per_target[BETTER_OF_L1_UNIFORM] = {t: _better(per_target["l1"][t], per_target["uniform"][t]) for t in targets}
            means = {m: _complete_means(v) for m, v in per_target.items()}
            for m in sorted(means, key=lambda m: (m == BETTER_OF_L1_UNIFORM, _method_order(m))):
                d = paired_difference(means[method], means[m]) if method in means and m != method else None
                out.append((weights, backbone, budget, m, means[m], d))
    return out


def _better(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {}
    return {s: a[s] for s in seeds} if statistics.fmean(a[s] for s in seeds) >= statistics.fmean(b[s] for s in seeds) \
        else {s: b[s] for s in seeds}


def _complete_means(by_target: dict[str, dict[int, float]]) -> dict[int, float]:
    seeds = set.intersection(*(set(v) for v in by_target.values())) if by_target else set()
    return {s: statistics.fmean(v[s] for v in by_target.values()) for s in sorted(seeds)}


def _target_means(rows: list[dict[str, Any]]) -> list[str]:
    table = target_means(rows)
    lines: list[str] = []
    for weights, backbone in dict.fromkeys((w, b) for w, b, *_ in table):
        mine = [row for row in table if row[:2] == (weights, backbone)]
        budgets = list(dict.fromkeys(row[2] for row in mine))
        lines += [f"### Mean over the targets: {_WEIGHT_LABELS.get(weights, weights)}, {backbone} "
                  "(top-1 %, seeds that have every target; STAMP − method paired over them)", "",
                  "| method | " + " | ".join(f"r={r:g} | STAMP − it" for r in budgets) + " |",
                  "|---|" + "---:|---:|" * len(budgets)]
        cells = {(row[2], row[3]): row for row in mine}
        for m in dict.fromkeys(row[3] for row in mine):
            parts = []
            for r in budgets:
                row = cells.get((r, m))
                seeds = row[4] if row else {}
                parts.append(f"{100 * statistics.fmean(seeds.values()):.1f} (n={len(seeds)})" if seeds else "–")
                parts.append(row[5].format() if row and row[5] is not None else "–")
            label = m if m == BETTER_OF_L1_UNIFORM else method_label(m)
            lines.append(f"| {label} | " + " | ".join(parts) + " |")
        lines.append("")
    return lines


def _paired(rows: list[dict[str, Any]]) -> list[str]:
    diffs = paired_table(rows)
    if not diffs:
        return ["No STAMP cells with baselines on the same seeds.", ""]
    lines: list[str] = []
    for weights in sorted({d[0] for d in diffs}, key=lambda w: w != "meta"):
        mine = [d for d in diffs if d[0] == weights]
        cols = sorted({(d[1], d[2], d[3]) for d in mine}, key=lambda c: (c[0], c[1], -c[2]))
        others = sorted({d[4] for d in mine}, key=_method_order)
        lines += [f"### On {_WEIGHT_LABELS.get(weights, weights)}: STAMP − baseline (points)", "",
                  "| baseline | " + " | ".join(f"{t} / {b} r={r:g}" for t, b, r in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        table = {(d[1], d[2], d[3], d[4]): d[5] for d in mine}
        for o in others:
            lines.append(f"| {method_label(o)} | " + " | ".join(
                table[(t, b, r, o)].format() if (t, b, r, o) in table else "–" for t, b, r in cols) + " |")
        lines.append("")
    return lines


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per weight set: where STAMP is significantly better or worse than each baseline."""
    lines = []
    diffs = paired_table(rows)
    for weights in sorted({d[0] for d in diffs}, key=lambda w: w != "meta"):
        wins, losses, ties = [], [], 0
        for w, target, backbone, budget, other, d in diffs:
            if w != weights or other == "full":
                continue
            where = f"{method_label(other)} on {target}/{backbone} r={budget:g} ({100 * d.mean:+.1f})"
            if d.significant and d.mean > 0:
                wins.append(where)
            elif d.significant:
                losses.append(where)
            else:
                ties += 1
        lines.append(
            f"- On {_WEIGHT_LABELS.get(weights, weights)}: STAMP significantly better than "
            f"{'; '.join(wins) or 'no baseline'}; significantly worse than {'; '.join(losses) or 'no baseline'}; "
            f"{ties} comparison(s) not significant (paired over seeds, 95% t interval)."
        )
    return lines


def _weights_effect(rows: list[dict[str, Any]]) -> list[str]:
    acc = _by_seed(rows)
    cols = sorted({(k[1], k[2], k[4]) for k in acc if k[3] != "full"}, key=lambda c: (c[0], c[1], -c[2]))
    methods = sorted({k[3] for k in acc if not k[3].startswith(CROSS_PREFIX)}, key=_method_order)
    if len({k[0] for k in acc}) < 2:
        return ["Only one weight set was run: add both `pretrained` and `meta` to `weights` for this table.", ""]
    lines = ["| method | " + " | ".join(f"{t} / {b} r={r:g}" for t, b, r in cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in methods:
        cells = []
        for t, b, r in cols:
            rr = 1.0 if m == "full" else r
            d = paired_difference(acc.get(("meta", t, b, m, rr), {}), acc.get(("pretrained", t, b, m, rr), {}))
            cells.append(d.format() if d else "–")
        lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _adaptivity(rows: list[dict[str, Any]], masks: dict[str, tuple[str, dict[str, list[int]]]]) -> list[str]:
    acc = _by_seed(rows)
    keys = sorted({(k[0], k[1], k[2], k[4]) for k in acc if k[3] == "stamp"}, key=lambda k: (k[0] != "meta", k[1], k[2], -k[3]))
    if not keys:
        return ["No STAMP cells.", ""]
    lines = ["Each row: one target at one budget. *own* = the mask STAMP generated from this target's sample; "
             "*mask for U* = the mask it generated from target U's sample, applied here; *mean* = the mean-embedding "
             "mask. Differences are paired over seeds (points, 95% interval). Jaccard distance 0 = identical masks "
             "(mean over seeds).", "",
             "| weights | target / backbone | r | own | masks for other targets | mean embedding | own − other | "
             "own − mean | Jaccard own vs other | Jaccard own vs mean |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    kept_of = _kept_by_cell(rows, masks)
    for weights, target, backbone, budget in keys:
        own = acc[(weights, target, backbone, "stamp", budget)]
        others = {k[3][len(CROSS_PREFIX):]: v for k, v in acc.items()
                  if k[:3] == (weights, target, backbone) and k[4] == budget and k[3].startswith(CROSS_PREFIX)}
        mean = acc.get((weights, target, backbone, "stamp_mean", budget), {})
        other_txt = "; ".join(f"{u}: {_pm(v.values())}" for u, v in sorted(others.items())) or "–"
        d_other = [paired_difference(own, v) for v in others.values()]
        d_mean = paired_difference(own, mean)
        jac_other = _mean_jaccard(kept_of, (target, backbone, budget), [(u, "stamp") for u in others])
        jac_mean = _mean_jaccard(kept_of, (target, backbone, budget), [(target, "stamp_mean")])
        lines.append(
            f"| {weights} | {target} / {backbone} | {budget:g} | {_pm(own.values())} | {other_txt} | "
            f"{_pm(mean.values()) if mean else '–'} | {', '.join(d.format() for d in d_other if d) or '–'} | "
            f"{d_mean.format() if d_mean else '–'} | {jac_other} | {jac_mean} |"
        )
    return lines + [""]


def _kept_by_cell(rows: list[dict[str, Any]], masks: dict[str, tuple[str, dict[str, list[int]]]]) -> dict[tuple[str, str, str, float, int], dict[str, list[int]]]:
    """STAMP-family masks by (target, backbone, method, budget, seed), whichever weights they were applied to."""
    out = {}
    for r in rows:
        rid = row_id(r)
        if r["method"] in ("stamp", "stamp_mean") and rid in masks and masks[rid][0] == r.get("fingerprint"):
            out[(r["target"], r["backbone"], r["method"], float(r["macs_ratio_target"]), int(r["seed"]))] = masks[rid][1]
    return out


def _mean_jaccard(kept_of: dict[tuple[str, str, str, float, int], dict[str, list[int]]], where: tuple[str, str, float],
                  against: list[tuple[str, str]]) -> str:
    target, backbone, budget = where
    values = []
    for (t, b, m, r, seed), kept in kept_of.items():
        if (t, b, m, r) != (target, backbone, "stamp", budget):
            continue
        for other_target, other_method in against:
            other = kept_of.get((other_target, backbone, other_method, budget, seed))
            if other is not None:
                values.append(jaccard_distance(kept, other))
    return f"{statistics.fmean(values):.3f}" if values else "–"


def _curve_points(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str, float], dict[int, list[tuple[float, float]]]]:
    """{(weights, target, backbone, method, budget): {epochs: [(accuracy, total seconds from data in hand)]}}.

    Total seconds = the cell's own mask time (a method's real cost, BBD's training included) + the
    median build + fine-tune time of *all* cells with the same target, backbone, budget and epochs.
    Nets at matched MACs train at the same cost, while single cells on a shared machine did not
    (4-24 s for the same 3 epochs in one run), which put identical masks in different columns.
    Table 7 keeps every cell's own times.
    """
    ok = _ok(rows)
    pooled: dict[tuple[str, str, float, int], list[float]] = defaultdict(list)
    for r in ok:
        build = float(r.get("build_seconds") or 0.0)
        for e, (_, s) in (r.get("curve") or {}).items():
            pooled[(r["target"], r["backbone"], _cost_budget(r), int(e))].append(build + s)
    train_s = {k: statistics.median(v) for k, v in pooled.items()}
    out: dict[tuple[str, str, str, str, float], dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        mask = float(r.get("mask_seconds") or 0.0)
        for e, (a, _) in (r.get("curve") or {}).items():
            total = mask + train_s[(r["target"], r["backbone"], _cost_budget(r), int(e))]
            out[(r["weights"], r["target"], r["backbone"], r["method"], float(r["macs_ratio_target"]))][int(e)].append((a, total))
    return out


def _cost_budget(row: dict[str, Any]) -> float:
    """The MACs a cell's net has: the full network's rows are at 1 whatever grid budget they carry."""
    return 1.0 if row["method"] == "full" else float(row["macs_ratio_target"])


def _epochs_view(rows: list[dict[str, Any]]) -> list[str]:
    curves = _curve_points(rows)
    epochs = sorted({e for c in curves.values() for e in c})
    if not epochs:
        return ["No fine-tune curves recorded.", ""]
    lines = ["Top-1 % (mean over seeds) after complete fine-tunes of the same pruned start; 0 = prototype head only.", "",
             "| weights | target / backbone | r | method | " + " | ".join(f"{e} ep" for e in epochs) + " |",
             "|---|---|---:|---|" + "---:|" * len(epochs)]
    for (w, t, b, m, r), c in sorted(curves.items(), key=lambda kv: (kv[0][0] != "meta", kv[0][1], kv[0][2], -kv[0][4], _method_order(kv[0][3]))):
        if m.startswith(CROSS_PREFIX):
            continue
        cells = [f"{100 * statistics.fmean(a for a, _ in c[e]):.1f}" if e in c else "–" for e in epochs]
        budget = "1 (full)" if m == "full" else f"{r:g}"
        lines.append(f"| {w} | {t} / {b} | {budget} | {method_label(m)} | " + " | ".join(cells) + " |")
    return lines + [""]


def cost_matched(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, float, list[float], dict[str, list[float | None]], dict[str, float]]]:
    """Per (weights, target, backbone, budget): STAMP's median total seconds at each curve point, and
    for every method the best mean accuracy among its curve points whose median total fits each of
    those times (None = it cannot deliver a model in that time), plus its equal-epochs accuracy."""
    curves = _curve_points(rows)
    acc = _by_seed(rows)
    out = []
    for (w, t, b, m, r), stamp_curve in sorted(curves.items()):
        if m != "stamp":
            continue
        times = sorted(statistics.median(s for _, s in pts) for pts in stamp_curve.values())
        reach: dict[str, list[float | None]] = {}
        equal: dict[str, float] = {}
        for (w2, t2, b2, m2, r2), c in curves.items():
            if (w2, t2, b2) != (w, t, b) or m2.startswith(CROSS_PREFIX) or (r2 != r and m2 != "full"):
                continue
            points = [(statistics.median(s for _, s in pts), statistics.fmean(a for a, _ in pts)) for pts in c.values()]
            reach[m2] = [max((a for s, a in points if s <= limit + 1e-9), default=None) for limit in times]
            seeds = acc.get((w2, t2, b2, m2, r2))
            if seeds:
                equal[m2] = statistics.fmean(seeds.values())
        out.append((w, t, b, r, times, reach, equal))
    return out


def _cost_view(rows: list[dict[str, Any]]) -> list[str]:
    blocks = cost_matched(rows)
    if not blocks:
        return ["No STAMP curves to match costs against.", ""]
    lines = ["Columns are wall-time budgets from data in hand to a deployable model: the median time STAMP needs "
             "for each point of its fine-tune curve (its mask time + the median build and fine-tune time of all "
             "cells at that budget and length, since equal-MACs nets train at equal cost). Each cell is the best mean top-1 % "
             "a method reaches within that time (– = it cannot deliver a model that fast); the last two columns "
             "rank the methods at equal fine-tune epochs and at the largest time budget.", ""]
    for w, t, b, r, times, reach, equal in blocks:
        lines += [f"**{w} / {t} / {b} / r={r:g}**", "",
                  "| method | " + " | ".join(f"≤ {s:.1f} s" for s in times) + " | rank, equal epochs | rank, equal time |",
                  "|---|" + "---:|" * (len(times) + 2)]
        eq_rank = {m: i + 1 for i, m in enumerate(sorted(equal, key=lambda m: -equal[m]))}
        last = {m: v[-1] for m, v in reach.items() if v and v[-1] is not None}
        time_rank = {m: i + 1 for i, m in enumerate(sorted(last, key=lambda m: -last[m]))}
        for m in sorted(reach, key=_method_order):
            cells = ["–" if v is None else f"{100 * v:.1f}" for v in reach[m]]
            lines.append(f"| {method_label(m)} | " + " | ".join(cells) + f" | {eq_rank.get(m, '–')} | {time_rank.get(m, '–')} |")
        lines.append("")
    return lines


def _all_cells(rows: list[dict[str, Any]]) -> list[str]:
    agg = aggregate(rows)
    agg.sort(key=lambda a: (a["weights"] != "meta", a["target"], a["backbone"], -a["budget"], _method_order(a["method"])))
    lines = ["| weights | target | backbone | MACs budget | method | top-1 % | MACs ratio | params (M) | latency b1 ms | "
             "latency b64 ms | mask s | build s | fine-tune s | total s | seeds ok |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v: float, fmt: str) -> str:
        return "–" if math.isnan(v) else format(v, fmt)

    for a in agg:
        acc = "failed" if math.isnan(a["accuracy"]) else f"{100 * a['accuracy']:.1f} ± {100 * a['accuracy_std']:.1f}"
        budget = "1 (full)" if a["method"] == "full" else f"{a['budget']:g}"
        lines.append(
            f"| {a['weights']} | {a['target']} | {a['backbone']} | {budget} | "
            f"{method_label(a['method'])} | {acc} | {num(a['macs_ratio'], '.3f')} | {num(a['params'] / 1e6, '.3f')} | "
            f"{num(a['latency_b1_ms'], '.2f')} | {num(a['latency_b64_ms'], '.1f')} | {num(a['mask_seconds'], '.2f')} | "
            f"{num(a['build_seconds'], '.2f')} | {num(a['finetune_seconds'], '.1f')} | {num(a['total_seconds'], '.1f')} | "
            f"{a['n_ok']}/{a['n']} |"
        )
    return lines + [""]


def results_markdown(rows: list[dict[str, Any]], cfg: BenchmarkConfig | None = None,
                     masks: dict[str, tuple[str, dict[str, list[int]]]] | None = None) -> str:
    """The Markdown report (see the module docstring for the tables and how to read them)."""
    lines = ["# STAMP vs pruning baselines at matched MACs", ""]
    if cfg is not None:
        ft = cfg.finetune
        lines += [
            f"Seeds {cfg.seeds}; weights {cfg.weights}; every mask goes through the same path (physical pruning, "
            f"BatchNorm recalibration {'on' if cfg.recalibrate_bn else 'off'}, prototype head, {ft.epochs}-epoch fine-tune "
            f"at lr {ft.lr:g}, batch {ft.batch_size}); curve {sorted(set(ft.curve) | {0, ft.epochs})} epochs; "
            f"up to {cfg.max_train_per_class} train / {cfg.max_test_per_class} test images per class; latency: median ms "
            f"per forward pass with {cfg.latency.threads} thread(s). Times in seconds from data in hand; *mask* includes a "
            "method's own training (Beta-Bernoulli dropout), *total* = mask + build + fine-tune. Nothing is tuned on a "
            "target's test split.",
            "",
        ]
        if cfg.evaluate_on == "dev":
            lines += [f"**Dev split**: scored on {cfg.dev_per_class} images per class held out of each target's "
                      "*training* split (test splits not read): numbers for method development, not claims.", ""]
    ok = _ok(rows)
    lines += ["## Summary", ""] + (summary_lines(rows) or ["No STAMP cells."]) + [""] + _target_means(ok)
    lines += ["## 1. Mask quality: every mask on the same weights (top-1 %, mean ± std over seeds)", ""] + _mask_quality(ok)
    lines += ["## 2. STAMP − baseline, paired over seeds (points; [95% interval]; bold = significant)", ""] + _paired(ok)
    lines += ["## 3. Weights: meta-trained − pretrained under the same mask method (points, paired)", ""] + _weights_effect(ok)
    lines += ["## 4. Adaptivity: own mask vs other targets' masks vs the mean embedding", ""] + _adaptivity(ok, masks or {})
    lines += ["## 5. Accuracy vs fine-tune epochs", ""] + _epochs_view(ok)
    lines += ["## 6. Cost-matched ranking (equal wall time) next to equal epochs", ""] + _cost_view(ok)
    lines += ["## 7. All cells", ""] + _all_cells(rows)
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += [f"## Failed cells ({len(failures)})", ""]
        lines += [f"- `{row_id(r)}`: {r.get('error') or 'unknown error'}" for r in failures[:50]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots and outputs


def _panels(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return _blocks(rows) or [("", "no results", "")]


def plot_benchmark_accuracy_vs_macs(rows: list[dict[str, Any]]) -> Any:
    """One panel per (weights, target, backbone): accuracy (mean ± std over seeds) against real MACs ratio."""
    from matplotlib.figure import Figure

    agg = aggregate(rows)
    panels = _panels(rows)
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (weights, target, backbone) in zip(axes, panels):
        mine = [a for a in agg if (a["weights"], a["target"], a["backbone"]) == (weights, target, backbone) and not math.isnan(a["accuracy"])]
        for method in sorted({a["method"] for a in mine}, key=_method_order):
            pts = sorted((a for a in mine if a["method"] == method), key=lambda a: a["macs_ratio"])
            xs, ys, es = [a["macs_ratio"] for a in pts], [100 * a["accuracy"] for a in pts], [100 * a["accuracy_std"] for a in pts]
            if method == "full":
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label=method_label(method))
                continue
            style = {"linewidth": 2.5} if method == "stamp" else {"linestyle": ":"} if method.startswith(CROSS_PREFIX) else {}
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method_label(method), **style)
        _finish_axis(ax, "MACs ratio (pruned / full)", f"{target} / {backbone} / {weights} weights")
    return fig


def plot_time_vs_accuracy(rows: list[dict[str, Any]]) -> Any:
    """One panel per (weights, target, backbone): each method's fine-tune curve as accuracy against seconds
    from data in hand (median over seeds, log x), all budgets."""
    from matplotlib.figure import Figure

    curves = _curve_points(rows)
    panels = _panels(rows)
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours: dict[str, Any] = {}
    for ax, (weights, target, backbone) in zip(axes, panels):
        for (w, t, b, m, r), c in sorted(curves.items(), key=lambda kv: _method_order(kv[0][3])):
            if (w, t, b) != (weights, target, backbone) or m.startswith(CROSS_PREFIX):
                continue
            pts = sorted((statistics.median(s for _, s in p), 100 * statistics.fmean(a for a, _ in p)) for p in c.values())
            label = method_label(m) if m not in colours else None
            line = ax.plot([max(s, 1e-2) for s, _ in pts], [a for _, a in pts], marker="o", markersize=3,
                           linewidth=2.5 if m == "stamp" else 1, color=colours.get(m), label=label)[0]
            colours.setdefault(m, line.get_color())
        ax.set_xscale("log")
        _finish_axis(ax, "seconds from data in hand to deployable model", f"{target} / {backbone} / {weights} (all budgets)")
    return fig


def _finish_axis(ax: Any, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save_figure(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(out: Path, rows: list[dict[str, Any]], cfg: BenchmarkConfig | None) -> tuple[Path, list[Path]]:
    """Write results.md and the two PNGs into ``out``; returns their paths."""
    md_path = out / RESULTS_MD
    _atomic_text(md_path, results_markdown(rows, cfg, read_masks(out / MASKS_JSONL)))
    plots = [_save_figure(plot_benchmark_accuracy_vs_macs(rows), out / ACCURACY_PNG),
             _save_figure(plot_time_vs_accuracy(rows), out / TIME_PNG)]
    return md_path, plots


def log_to_mlflow(cfg: BenchmarkConfig, tracking_uri: str, result: Any) -> str:
    """One MLflow run with the settings, per-cell mean accuracies and times, and every output file."""
    import mlflow

    from pipeline.registry import ensure_experiment, use_tracking_uri

    experiment_id = ensure_experiment(cfg.mlflow.experiment, tracking_uri)
    with use_tracking_uri(tracking_uri):
        with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.name) as run:
            mlflow.set_tags({"stamp.kind": "benchmark", "stamp.cells": str(len(result.rows))})
            mlflow.log_params({k: v[:500] for k, v in cfg.flat_params().items()})
            metrics = {}
            for a in aggregate(result.rows):
                if math.isnan(a["accuracy"]):
                    continue
                key = f"{a['target']}.{a['backbone']}.{a['weights']}.{a['method'].replace('@', '_at_')}.r{a['budget']:g}"
                metrics[f"accuracy.{key}"] = a["accuracy"]
                metrics[f"total_seconds.{key}"] = a["total_seconds"]
                metrics[f"macs_ratio.{key}"] = a["macs_ratio"]
            metrics["cells_failed"] = float(sum(r["status"] == "failed" for r in result.rows))
            mlflow.log_metrics(metrics)
            for path in (result.csv_path, result.markdown_path, *result.plots):
                mlflow.log_artifact(str(path))
            masks = result.out_dir / MASKS_JSONL
            if masks.is_file():
                mlflow.log_artifact(str(masks))
            return run.info.run_id
