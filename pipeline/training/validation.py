"""Meta-validation: prune held-out source tasks at a fixed budget, fine-tune briefly, score; end-of-run plots.

Rank 0 of meta-training validates every ``validation.every`` steps and at the end (Tune's
objective is ``val_accuracy``); the final validation also feeds the run's plots.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import MetaTrainConfig
from pipeline.data import load_split_arrays
from pipeline.training.context import WorkerSetup
from stamp_core import (PruneSpec, StampPruner, TaskSummary, TrainConfig, build_task_model, jaccard_distance,
                        prepare_images, prune_and_finetune, prune_for_task)
from stamp_core.baselines import ScoringInput, spec_by_criterion


@dataclass
class ValTask:
    """One held-out task: prune + fine-tune on ``x_train``, score on ``x_test``."""

    dataset: str
    classes: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def build_val_tasks(cfg: MetaTrainConfig, setup: WorkerSetup) -> list[ValTask]:
    """Deterministic held-out tasks from ``validation.split`` of the validation sources."""
    vc = cfg.validation
    names = list(vc.sources or cfg.data.sources)  # sources are resolved to a list by the driver
    rng = np.random.default_rng(vc.seed)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tasks = []
    need = vc.shots + vc.test_per_class
    for t in range(vc.tasks):
        name = names[t % len(names)]
        if name not in arrays:
            arrays[name] = load_split_arrays(setup.catalog_url, name, vc.split, endpoint_url=setup.s3_endpoint)
        x, y = arrays[name]
        by_class = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        eligible = sorted(c for c, idx in by_class.items() if len(idx) >= need)
        k = min(vc.ways, len(eligible))
        if k < 2:
            raise ValueError(
                f"validation: dataset {name!r} split {vc.split!r} has {len(eligible)} classes with "
                f"{need} images (shots + test_per_class); lower them or pick other validation.sources"
            )
        classes = [int(c) for c in rng.choice(eligible, size=k, replace=False)]
        train_idx, test_idx, y_tr, y_te = [], [], [], []
        for j, c in enumerate(classes):
            picks = rng.permutation(by_class[c])[:need]
            train_idx.extend(picks[: vc.shots])
            test_idx.extend(picks[vc.shots:])
            y_tr += [j] * vc.shots
            y_te += [j] * vc.test_per_class
        tasks.append(ValTask(
            dataset=name,
            classes=classes,
            x_train=prepare_images(x[np.asarray(train_idx)], cfg.data.image_size),
            y_train=torch.tensor(y_tr, dtype=torch.int64),
            x_test=prepare_images(x[np.asarray(test_idx)], cfg.data.image_size),
            y_test=torch.tensor(y_te, dtype=torch.int64),
        ))
    return tasks


def _cpu_copy(pruner: StampPruner) -> StampPruner:
    from stamp_core import PrunerConfig

    copy = StampPruner(PrunerConfig(**asdict(pruner.config)))
    copy.load_state_dict({k: v.detach().cpu() for k, v in pruner.state_dict().items()})
    return copy


def _finetune_settings(cfg: MetaTrainConfig, task_index: int) -> TrainConfig:
    vc = cfg.validation
    return TrainConfig(epochs=vc.finetune_epochs, batch_size=vc.batch_size, lr=vc.finetune_lr, seed=vc.seed + task_index)


def _validate_at(pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig, macs_ratio: float
                 ) -> tuple[list[float], list[float], list[PruneSpec]]:
    """Accuracy after / before the fine-tune and the spec of every task pruned at ``macs_ratio``."""
    accs, accs0, specs = [], [], []
    with torch.random.fork_rng(devices=[]):
        on_cpu = next(pruner.parameters()).device.type == "cpu"
        model = pruner if on_cpu else _cpu_copy(pruner)  # mask calibration runs on CPU
        for i, task in enumerate(tasks):
            res = prune_for_task(model, task.x_train, task.y_train, task.x_test, task.y_test,
                                 macs_ratio=macs_ratio, finetune=_finetune_settings(cfg, i))
            accs.append(float(res.accuracy))
            accs0.append(float(res.accuracy_before_finetune))
            specs.append(res.spec)
    return accs, accs0, specs


def reference_accuracies(pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig, criterion: str,
                         macs_ratio: float) -> list[float]:
    """Accuracy of each task pruned by ``criterion`` instead of STAMP: same weights (the pruner's
    backbone), budget, fine-tune settings and seeds, so the difference is the mask alone."""
    accs = []
    with torch.random.fork_rng(devices=[]):
        model = pruner if next(pruner.parameters()).device.type == "cpu" else _cpu_copy(pruner)
        for i, task in enumerate(tasks):
            # one-batch criteria (SNIP, GraSP) need the task's head: the full net with a prototype head
            scored = build_task_model(model.backbone, None, task.x_train, task.y_train)
            spec = spec_by_criterion(criterion, ScoringInput(scored, model.structure, task.x_train, task.y_train,
                                                             macs_ratio, seed=cfg.validation.seed + i),
                                     model.backbone.config)
            res = prune_and_finetune(model.backbone, spec, task.x_train, task.y_train, task.x_test, task.y_test,
                                     _finetune_settings(cfg, i))
            accs.append(float(res.accuracy))
    return accs


def meta_validate(pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig,
                  specs_out: list[PruneSpec] | None = None) -> dict[str, float]:
    """Prune every held-out task at ``validation.macs_ratio``, fine-tune briefly, score; the same
    for ``validation.reference``'s mask (``val_gain_vs_<reference>``: STAMP minus it, points/100).

    Runs on a forked RNG so validating does not change the training trajectory. ``specs_out``,
    when given, receives each task's spec (the end-of-run plots reuse them).
    """
    vc = cfg.validation
    t0 = time.perf_counter()
    accs, accs0, specs = _validate_at(pruner, tasks, cfg, vc.macs_ratio)
    if specs_out is not None:
        specs_out[:] = specs
    reference = {}
    if vc.reference:
        ref = reference_accuracies(pruner, tasks, cfg, vc.reference, vc.macs_ratio)
        reference = {f"val_accuracy_{vc.reference}": float(np.mean(ref)),
                     f"val_gain_vs_{vc.reference}": float(np.mean(accs) - np.mean(ref))}
    return {
        "val_accuracy": float(np.mean(accs)),
        **reference,
        "val_accuracy_before_finetune": float(np.mean(accs0)),
        "val_macs_ratio": float(np.mean([s.macs_pruned / s.macs_full for s in specs])),
        "val_macs_ratio_target": vc.macs_ratio,
        **adaptivity_diagnostics(pruner, tasks, vc.macs_ratio, specs),
        "val_seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def adaptivity_diagnostics(pruner: StampPruner, tasks: list[ValTask], macs_ratio: float,
                           specs: list[PruneSpec]) -> dict[str, float]:
    """Is the set encoder telling tasks apart? (issue 16: v1 collapsed within tens of steps)

    * ``val_embedding_min_cosine``: the smallest cosine between two held-out tasks' embeddings
      (1.0 = every task looks the same to the generator);
    * ``val_jaccard_vs_mean``: mean Jaccard distance between each task's mask and the mask of the
      tasks' mean embedding at ``macs_ratio`` (0 = the set encoder changes nothing);
    * ``val_jaccard_between_tasks``: mean Jaccard distance between two tasks' masks.
    """
    if len(tasks) < 2:
        return {}
    was_training = pruner.training
    pruner.eval()
    try:
        model = pruner if next(pruner.parameters()).device.type == "cpu" else _cpu_copy(pruner)
        summaries = [model.summarize(task.x_train, task.y_train) for task in tasks]
        e = torch.nn.functional.normalize(torch.stack([s.embedding for s in summaries]), dim=1)
        cos = e @ e.T
        off = ~torch.eye(len(tasks), dtype=torch.bool)
        mean_spec = model.generate(tasks[0].x_train[:1], None, macs_ratio=macs_ratio,
                                   embedding=TaskSummary.mean(summaries))
    finally:
        pruner.train(was_training)
    pairs = [jaccard_distance(a.kept, b.kept) for i, a in enumerate(specs) for b in specs[i + 1:]]
    return {
        "val_embedding_min_cosine": float(cos[off].min()),
        "val_jaccard_vs_mean": float(np.mean([jaccard_distance(s.kept, mean_spec.kept) for s in specs])),
        "val_jaccard_between_tasks": float(np.mean(pairs)),
    }


def log_run_plots(client: Any, run_id: str, pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig,
                  at_budget: tuple[float, float, list[PruneSpec]] | None = None) -> list[str]:
    """The run's plots, as MLflow artifacts under ``plots/``; returns their artifact paths.

    ``at_budget`` = (real MACs ratio, accuracy, specs) already measured at ``validation.macs_ratio``
    (by the final :func:`meta_validate`), so that budget is not pruned and fine-tuned twice.

    * kept-channel fraction per layer for (up to six) held-out tasks at ``validation.macs_ratio``;
    * accuracy against MACs ratio over ``validation.curve_ratios`` (+ ``macs_ratio``), mean over tasks;
    * training curves from the run's metric history (so a resumed run plots its whole history).
    """
    from pipeline.plots import plot_accuracy_vs_macs, plot_kept_fractions, plot_training_curves  # matplotlib

    vc = cfg.validation
    figures = {}
    curve: list[tuple[float, float]] = []
    kept: dict[str, PruneSpec] = {}
    for ratio in sorted({*vc.curve_ratios, vc.macs_ratio}):
        if ratio == vc.macs_ratio and at_budget is not None:
            real_ratio, acc, specs = at_budget
            curve.append((real_ratio, acc))
        else:
            accs, _, specs = _validate_at(pruner, tasks, cfg, ratio)
            curve.append((float(np.mean([s.macs_pruned / s.macs_full for s in specs])), float(np.mean(accs))))
        if ratio == vc.macs_ratio:
            kept = {f"task {i} ({t.dataset} {t.classes})": s for i, (t, s) in enumerate(zip(tasks, specs))}
    figures["plots/kept_fractions.png"] = plot_kept_fractions(kept)
    figures["plots/accuracy_vs_macs.png"] = plot_accuracy_vs_macs(
        {f"STAMP, {len(tasks)} held-out tasks, {vc.finetune_epochs} fine-tune epoch(s)": curve},
        title="Meta-validation accuracy vs MACs")
    keys = ["ce", "accuracy", "expected_macs_ratio", "macs_gap", "data_wait_fraction", "val_accuracy",
            *([f"val_gain_vs_{vc.reference}"] if vc.reference else []), "val_embedding_min_cosine", "val_jaccard_vs_mean"]
    history: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(int(m.step), {"step": float(m.step)})[key] = float(m.value)
    records = [history[s] for s in sorted(history)]
    present = [k for k in keys if any(k in r for r in records)]
    if records and present:
        figures["plots/training_curves.png"] = plot_training_curves(records, present, title=f"Meta-training {cfg.run_name}")
    for path, fig in figures.items():
        client.log_figure(run_id, fig, path)
    return list(figures)
