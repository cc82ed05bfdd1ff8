"""Tests for pipeline.training.validation: the end-of-run plots logged to a real MLflow run, and the
validation budgets' checks."""

from __future__ import annotations

import secrets

import pytest
import torch

from pipeline.training import build_pruner, build_val_tasks, log_run_plots, prepare_meta_train
from tests.pipeline.training._jobs import tiny_meta_config


@pytest.mark.integration
def test_run_plots_are_logged_to_the_run(local_catalog: str, mlflow_server: str) -> None:
    """Kept fractions per held-out task, accuracy vs MACs over the curve budgets, training curves."""
    from mlflow.tracking import MlflowClient

    cfg, setup, _ = prepare_meta_train(tiny_meta_config(local_catalog, validation={"curve_ratios": [0.2, 0.6]}))
    assert cfg.validation.curve_ratios == [0.2, 0.6]
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"plots-{secrets.token_hex(4)}")).info.run_id
    for step in (2, 4):
        client.log_metric(run_id, "ce", 1.0 / step, step=step)
        client.log_metric(run_id, "expected_macs_ratio", 0.5, step=step)
    client.log_metric(run_id, "val_accuracy", 0.4, step=4)  # sparse metrics join the same steps
    torch.manual_seed(0)
    pruner = build_pruner(cfg)
    tasks = build_val_tasks(cfg, setup)

    logged = log_run_plots(client, run_id, pruner, tasks, cfg)

    assert logged == ["plots/kept_fractions.png", "plots/accuracy_vs_macs.png", "plots/training_curves.png"]
    stored = {a.path: a.file_size for a in client.list_artifacts(run_id, "plots")}
    assert set(stored) == set(logged) and all(size > 5000 for size in stored.values())


def test_curve_ratios_are_validated(local_catalog: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"curve_ratios \[1.5\] outside \(0, 1\]"):
        tiny_meta_config(local_catalog, validation={"curve_ratios": [0.3, 1.5]})


def test_adaptivity_diagnostics_tell_a_task_blind_pruner_from_a_task_sensitive_one(local_catalog: str) -> None:
    """A fresh L1-start pruner (zero task residual) gives every task the mean-embedding mask: both
    Jaccard diagnostics are exactly 0; v1's default-scale heads already map tasks to other masks."""
    from pipeline.training.validation import adaptivity_diagnostics, meta_validate
    from stamp_core import StampPruner

    cfg, setup, _ = prepare_meta_train(tiny_meta_config(local_catalog))
    tasks = build_val_tasks(cfg, setup)
    assert len(tasks) >= 2
    torch.manual_seed(0)
    blind = build_pruner(cfg)
    metrics = meta_validate(blind, tasks, cfg)
    assert metrics["val_jaccard_vs_mean"] == 0.0 and metrics["val_jaccard_between_tasks"] == 0.0
    assert -1.0 <= metrics["val_embedding_min_cosine"] < 1.0
    sensitive = StampPruner.create(blind.backbone, image_size=cfg.data.image_size, score_init="none")
    specs = [sensitive.generate(t.x_train, t.y_train, macs_ratio=0.3) for t in tasks]
    found = adaptivity_diagnostics(sensitive, tasks, 0.3, specs)
    assert found["val_jaccard_vs_mean"] > 0.0 and found["val_jaccard_between_tasks"] > 0.0


def test_reference_criterion_is_scored_on_the_same_tasks_and_a_fresh_l1_start_ties_it(local_catalog: str) -> None:
    """``val_gain_vs_l1`` is STAMP minus L1 on the same weights, tasks and fine-tune seeds: a fresh
    channel generator starts exactly at L1's mask, so the gain is exactly 0. A planted criterion
    shows the reference really prunes each task with the named criterion, at the validation budget."""
    from pipeline.training.validation import meta_validate, reference_accuracies
    from stamp_core.baselines import register_criterion, score_uniform, unregister_criterion

    cfg, setup, _ = prepare_meta_train(tiny_meta_config(local_catalog, pruner={"generator": "channel", "score_init": "l1"}))
    tasks = build_val_tasks(cfg, setup)
    torch.manual_seed(0)
    pruner = build_pruner(cfg)
    metrics = meta_validate(pruner, tasks, cfg)
    assert metrics["val_accuracy_l1"] == metrics["val_accuracy"]
    assert metrics["val_gain_vs_l1"] == 0.0

    seen: list[tuple[int, float]] = []

    @register_criterion("planted_last", "planted")
    def _planted(inp):  # keeps the last channels of each group: not L1's mask
        seen.append((len(inp.x), inp.macs_ratio))
        return [s.flip(0) for s in score_uniform(inp.structure)]

    try:
        accs = reference_accuracies(pruner, tasks, cfg, "planted_last", cfg.validation.macs_ratio)
    finally:
        unregister_criterion("planted_last")
    assert seen == [(len(t.x_train), cfg.validation.macs_ratio) for t in tasks]
    assert len(accs) == len(tasks) and all(0.0 <= a <= 1.0 for a in accs)


def test_validation_reference_must_be_a_one_pass_criterion(local_catalog: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown pruning criterion 'l2': expected one of"):
        tiny_meta_config(local_catalog, validation={"reference": "l2"})
    with pytest.raises(ValidationError, match="validation reference 'bbd' trains on the task"):
        tiny_meta_config(local_catalog, validation={"reference": "bbd"})
    assert tiny_meta_config(local_catalog, validation={"reference": None}).validation.reference is None
