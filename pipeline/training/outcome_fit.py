"""Fit the outcome pruner (``generator: outcome``) from an outcome table, with its penalty chosen by held-out groups.

The table (:mod:`pipeline.training.outcomes`) holds, per source task and budget, the task's features and every
candidate's deployed accuracy. :class:`Observations` turns it into arrays; :func:`cross_validate` scores a
*chooser* (fit on some tasks, pick one candidate per other task) by the accuracy its picks actually reached on
held-out groups of tasks (whole families, or every domain of one class subset); :func:`fit_outcome_pruner` picks
the ridge penalty that way, refits on every task, and saves (and registers) the pruner.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, resolved_tracking_uri
from pipeline.config.fit_pruner import FitPrunerConfig
from pipeline.registry.backbones import load_backbone
from pipeline.registry.loading import pin_model_uri
from pipeline.training.outcomes import load_outcome_table, task_family
from stamp_core import StampPruner
from stamp_core.candidates import FEATURE_NAMES
from stamp_core.outcome_predictor import OutcomePredictor


def task_class_subset(dataset: str) -> str:
    """Every domain variant of one class subset maps to one name (``tin-c1-2-3``)."""
    found = re.match(r"^([a-z0-9]+)(-c\d+(?:-\d+)*)?", dataset)
    return found.group(0) if found and found.group(2) else task_family(dataset) + "-all"


HOLDOUTS: dict[str, Callable[[str], str]] = {"family": task_family, "class_subset": task_class_subset}


class Observations:
    """One row per (task, budget) of a table: the features, the budget and each candidate's mean accuracy (%).

    ``candidates`` None takes every candidate the table scored; a (task, budget) that lacks one is left out.
    """

    def __init__(self, records: Sequence[dict[str, Any]], candidates: Sequence[str] | None = None) -> None:
        counts = collections.Counter(row["candidate"] for rec in records for row in rec["rows"])
        self.candidates = list(candidates) if candidates else sorted(counts, key=lambda c: (-counts[c], c))
        feats, budgets, accs, datasets, ids = [], [], [], [], []
        for rec in records:
            cells: dict[float, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
            for row in rec["rows"]:
                cells[row["r"]][row["candidate"]].append(100.0 * row["accuracy"])
            for r, by in sorted(cells.items()):
                if not set(self.candidates) <= set(by):
                    continue
                feats.append([rec["features"][k] for k in FEATURE_NAMES])
                budgets.append(r)
                accs.append([float(np.mean(by[c])) for c in self.candidates])
                datasets.append(rec["dataset"])
                ids.append(rec["task_id"])
        if not feats:
            raise ValueError(f"the table has no task scored with every candidate of {self.candidates}")
        self.features = torch.tensor(feats, dtype=torch.float64)
        self.r = torch.tensor(budgets, dtype=torch.float64)
        self.acc = torch.tensor(accs, dtype=torch.float64)
        self.dataset = datasets
        self.task_id = ids

    def __len__(self) -> int:
        return len(self.r)

    def relative(self, index: np.ndarray) -> torch.Tensor:
        """Accuracy minus the mean over candidates, per observation of ``index``."""
        a = self.acc[index]
        return a - a.mean(1, keepdim=True)

    def groups(self, holdout: str) -> np.ndarray:
        return np.array([HOLDOUTS[holdout](d) for d in self.dataset])


#: fit on observations ``train``, return the index of the chosen candidate for each of ``test``
Chooser = Callable[[Observations, np.ndarray, np.ndarray], np.ndarray]


def choose_shared(obs: Observations, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The candidate best on average over the training tasks at the test task's budget (no adaptivity)."""
    out = np.empty(len(test), dtype=int)
    for i, j in enumerate(test):
        same = train[obs.r[train].numpy() == float(obs.r[j])]
        out[i] = int(obs.relative(same).mean(0).argmax())
    return out


def fit_predictor(obs: Observations, index: np.ndarray, ridge: float) -> OutcomePredictor:
    return OutcomePredictor.fit(obs.features[index], obs.r[index], obs.relative(index), obs.candidates, FEATURE_NAMES, ridge)


def choose_ridge(ridge: float) -> Chooser:
    """The outcome predictor's first choice (all training budgets in one fit)."""
    def choose(obs: Observations, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return fit_predictor(obs, train, ridge)(obs.features[test], obs.r[test]).argmax(1).numpy()
    return choose


def choose_knn(k: int) -> Chooser:
    """The candidate best on average over the ``k`` nearest training tasks (standardised features, same budget)."""
    def choose(obs: Observations, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        scale = obs.features[train].std(0).clamp_min(1e-6)
        out = np.empty(len(test), dtype=int)
        for i, j in enumerate(test):
            same = train[obs.r[train].numpy() == float(obs.r[j])]
            d = (((obs.features[same] - obs.features[j]) / scale) ** 2).sum(1)
            out[i] = int(obs.relative(same[torch.argsort(d)[:k].numpy()]).mean(0).argmax())
        return out
    return choose


def cross_validate(obs: Observations, groups: np.ndarray, chooser: Chooser, index: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-group-out picks for every observation of ``index`` (default all): ``picked[j]`` is the candidate
    chosen for ``j`` by ``chooser`` fitted without ``j``'s group."""
    index = np.arange(len(obs)) if index is None else index
    picked = np.full(len(obs), -1, dtype=int)
    for g in np.unique(groups[index]):
        test, train = index[groups[index] == g], index[groups[index] != g]
        if len(train) >= 2:
            picked[test] = chooser(obs, train, test)
    return picked


def realized(obs: Observations, picked: np.ndarray) -> np.ndarray:
    """Accuracy (%) each observation reached with its picked candidate (NaN where nothing was picked)."""
    out = np.full(len(obs), np.nan)
    ok = picked >= 0
    out[ok] = obs.acc[np.flatnonzero(ok), picked[ok]].numpy()
    return out


def select_ridge(obs: Observations, groups: np.ndarray, ridges: Sequence[float], index: np.ndarray | None = None) -> float:
    """The penalty whose leave-one-group-out picks reach the highest mean accuracy over ``index``; the largest
    (the most nearly shared) when ``index`` holds fewer than two groups to hold out."""
    def score(p: float) -> float:
        return float(np.nanmean(realized(obs, cross_validate(obs, groups, choose_ridge(p), index))[index]))
    index = np.arange(len(obs)) if index is None else index
    if len(np.unique(groups[index])) < 2:
        return max(ridges)
    return max(ridges, key=score)


def choose_ridge_cv(ridges: Sequence[float], groups: np.ndarray) -> Chooser:
    """``choose_ridge`` with the penalty picked by an inner leave-one-group-out on the training groups only."""
    def choose(obs: Observations, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        return choose_ridge(select_ridge(obs, groups, ridges, train))(obs, train, test)
    return choose


# =============================================================================== the job


@dataclass
class FitResult:
    pruner_dir: Path
    ridge: float
    tasks: int
    observations: int
    #: per budget: mean held-out accuracy of the predictor's picks minus the shared pick's (leave-one-group-out).
    #: The penalty was chosen on the same folds, so this is optimistic; bench_outcomes' ``ridge(cv)`` is nested.
    cv_gain: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    model_uri: str | None = None


def fit_outcome_pruner(cfg: FitPrunerConfig) -> FitResult:
    """Load the table, choose the penalty on held-out groups, refit on all, save and (optionally) register."""
    t0 = time.perf_counter()
    tracking_uri = resolved_tracking_uri(cfg.mlflow)
    pretrained = pin_model_uri(cfg.pretrained, tracking_uri)[0] if cfg.pretrained.startswith("models:/") else cfg.pretrained
    records = load_outcome_table(cfg.table)
    measured_on = sorted({r["backbone"] for r in records})
    if measured_on != [pretrained]:
        raise ConfigError(f"pretrained: {pretrained} is not the backbone the table was measured on ({', '.join(measured_on)}): "
                          "a pruner must choose masks for the weights its outcomes came from")
    obs = Observations(records, cfg.candidates)
    groups = obs.groups(cfg.holdout)
    ridge = select_ridge(obs, groups, cfg.ridges)
    gain = realized(obs, cross_validate(obs, groups, choose_ridge(ridge))) - realized(obs, cross_validate(obs, groups, choose_shared))
    cv_gain = {f"{r:g}": float(np.nanmean(gain[obs.r.numpy() == r])) for r in sorted(set(obs.r.tolist()))}
    backbone = load_backbone(pretrained, tracking_uri=tracking_uri)
    pruner = StampPruner.create(backbone, image_size=cfg.image_size, generator="outcome", candidates=obs.candidates,
                                embed_dim=8, num_heads=1, num_inducing=1, hidden_dim=8,
                                support_per_class=cfg.support_per_class, max_support=cfg.max_support)
    pruner.generator.predictor.load_state_dict(fit_predictor(obs, np.arange(len(obs)), ridge).state_dict())
    pruner.config.metadata = {"table": cfg.table, "backbone": pretrained, "ridge": ridge, "holdout": cfg.holdout,
                              "tasks": len(set(obs.task_id)), "cv_gain_vs_shared": cv_gain}
    out = Path(cfg.out_dir) if cfg.out_dir else _default_out(cfg.run_name)
    pruner.save(out)
    result = FitResult(out, ridge, len(set(obs.task_id)), len(obs), cv_gain, round(time.perf_counter() - t0, 1))
    if cfg.mlflow.enabled:
        from pipeline.registry import log_pruner

        metrics = {"ridge": ridge, "tasks": result.tasks, **{f"cv_gain_vs_shared_r{k}": v for k, v in cv_gain.items()
                                                            if math.isfinite(v)}}
        registered = log_pruner(pruner, name=cfg.mlflow.model_name, metrics=metrics, params=cfg.flat_params(),
                                tags={"stamp.kind": "fit_pruner", "stamp.generator": "outcome"},
                                lineage={"outcome_table": cfg.table, "backbone": pretrained, "config": cfg.model_dump(mode="json")},
                                experiment=cfg.mlflow.experiment, tracking_uri=tracking_uri)
        result.model_uri = registered.uri
    return result


def _default_out(run_name: str) -> Path:
    from pipeline.settings import get_settings

    return get_settings().state_dir / "pruners" / run_name
