"""Tests for pipeline.training.tune: trial configs, best-trial choice, and a real 2-trial Ray Tune run whose
best pruner is registered in MLflow, with the champion alias moving only for a better pruner."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import TuneConfig
from pipeline.data import build_procedural, ingest_dataset
from pipeline.training import TrialSummary, pick_best, register_best, run_tune, trial_config, trial_template
from stamp_core import StampPruner

SOURCES = ("blobs", "stripes")


def _tune_cfg(catalog_url: str, storage: str, **overrides: Any) -> TuneConfig:
    data: dict[str, Any] = dict(
        name="tune-test",
        storage_path=storage,
        num_samples=2,
        max_concurrent_trials=2,
        scheduler={"grace_period": 4},  # = steps: ASHA never stops a trial early here (two trials can tie at step 2)
        search={"kl_weight": {"low": 1e-5, "high": 1e-3}, "macs_weight": {"low": 5.0, "high": 50.0},
                "lr": {"low": 1e-4, "high": 1e-2}, "backbone_lr": None},
        meta_train=dict(
            backbone="small_cnn",
            backbone_kwargs={"width": 8},
            steps=4,
            report_every=2,
            checkpoint_every=2,
            data={"catalog_url": catalog_url, "sources": "all"},
            episodes={"ways": [2, 4], "support_per_class": 5, "query_size": 16},
            validation={"every": 2, "tasks": 2, "ways": 3, "shots": 3, "test_per_class": 4, "finetune_epochs": 1},
            pruner={"embed_dim": 32, "hidden_dim": 32, "num_inducing": 8},
            scaling={"num_workers": 1},
            mlflow={"enabled": False},
        ),
    )
    data.update(overrides)
    return TuneConfig.model_validate(data)


@pytest.fixture(scope="module")
def local_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = tmp_path_factory.mktemp("tune-data")
    for name in SOURCES:
        ingest_dataset(build_procedural(name, n_per_class=30, seed=1, n_test_per_class=10), str(dest),
                       shard_size=100, progress=False)
    return str(dest / "catalog.json")


def test_trial_template_validates_every_report(local_catalog: str, tmp_path: Path) -> None:
    cfg = _tune_cfg(local_catalog, str(tmp_path), meta_train={
        **_tune_cfg(local_catalog, str(tmp_path)).meta_train.model_dump(mode="json"),
        "steps": 10, "report_every": 1, "checkpoint_every": 5, "validation": {"every": 0}})
    mt = trial_template(cfg, str(tmp_path))
    # Tune needs the objective in every result, so reports happen exactly at validations.
    assert mt.report_every == mt.checkpoint_every == mt.validation.every == 5
    assert mt.data.sources == list(SOURCES)
    assert mt.storage_path == f"{tmp_path}/tune-test/train_runs"
    trial = trial_config(mt.model_dump(mode="json"), {"kl_weight": 0.5, "lr": 0.02, "unrelated": 1})
    assert (trial.optim.kl_weight, trial.optim.lr, trial.optim.macs_weight) == (0.5, 0.02, mt.optim.macs_weight)


def test_pick_best_prefers_trials_that_finished() -> None:
    trials = [
        TrialSummary("a", "trial-a", {}, 0.9, 0.3, step=2),  # stopped early by ASHA
        TrialSummary("b", "trial-b", {}, 0.7, 0.3, step=10),
        TrialSummary("c", "trial-c", {}, 0.8, 0.3, step=10),
        TrialSummary("d", "trial-d", {}, None, None, step=None, error="boom"),
    ]
    assert pick_best(trials, max_step=10).trial_id == "c"
    assert pick_best(trials[:1], max_step=10).trial_id == "a"
    with pytest.raises(RuntimeError, match="d: boom"):
        pick_best(trials[3:], max_step=10)


@pytest.mark.integration
@pytest.mark.slow
def test_two_trial_tune_registers_best_and_guards_the_champion(
    ray_local: None, mlflow_server: str, local_catalog: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline import registry

    model_name = f"stamp-test-{secrets.token_hex(3)}"
    base = _tune_cfg(local_catalog, str(tmp_path / "ray"))
    cfg = _tune_cfg(
        local_catalog, str(tmp_path / "ray"), register=True, model_name=model_name,
        meta_train={**base.meta_train.model_dump(mode="json"), "mlflow": {"enabled": True, "experiment": "test-tune"}},
    )
    calls: list[tuple[str, dict[str, Any], bool]] = []
    lock = threading.Lock()  # like a real display's: the handler cannot be pickled (Tune pickles its RunConfig)

    def on_result(trial: str, metrics: dict[str, Any], finished: bool) -> None:
        with lock:
            calls.append((trial, metrics, finished))

    result = run_tune(cfg, on_result=on_result)

    # This process saw every trial's reports (steps 2 and 4, with the objective) and its end, in order.
    by_trial: dict[str, list[Any]] = {}
    for trial, metrics, finished in calls:
        by_trial.setdefault(trial, []).append("end" if finished else (metrics["step"], "val_accuracy" in metrics))
    assert sorted(by_trial.values()) == [[(2, True), (4, True), "end"]] * 2

    # No trial keeps CPUs reserved once the sweep is over (Ray Train worker groups used to leak,
    # and every later 1-CPU task in this Ray waited forever).
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert len(result.trials) == 2
    assert all(t.error is None and t.val_accuracy is not None and t.step == 4 for t in result.trials)
    assert result.best.val_accuracy == max(t.val_accuracy for t in result.trials)  # type: ignore[misc]
    assert result.trials[0].hyperparams != result.trials[1].hyperparams
    for t in result.trials:
        assert 1e-5 <= t.hyperparams["kl_weight"] <= 1e-3 and 5.0 <= t.hyperparams["macs_weight"] <= 50.0
        assert "backbone_lr" not in t.hyperparams  # a null dimension keeps the template's value
    assert result.metrics["val_accuracy"] == result.best.val_accuracy
    assert 0 < result.metrics["val_macs_ratio"] <= 0.3 + 1e-9
    pruner = StampPruner.load(result.pruner_dir)
    assert pruner.config.metadata["step"] == 4

    client = MlflowClient(mlflow_server)
    children = client.search_runs(
        [client.get_experiment_by_name("test-tune").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'",
    )
    assert len(children) == 2 and all("val_accuracy" in r.data.metrics for r in children)
    # Each trial's run got its end-of-run plots from rank 0.
    for child in children:
        plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert plots == {"plots/kept_fractions.png", "plots/accuracy_vs_macs.png", "plots/training_curves.png"}

    # The first registered version becomes champion.
    assert (result.registered_version, result.champion_moved) == ("1", True)
    assert registry.get_version_by_alias(model_name, "champion", tracking_uri=mlflow_server).version == "1"
    best = float(result.best.val_accuracy)  # type: ignore[arg-type]
    # A worse candidate is registered but the alias stays ...
    version, moved = register_best(result.pruner_dir, {**result.metrics, "val_accuracy": best - 0.25}, cfg)
    assert (version, moved) == ("2", False)
    assert registry.get_version_by_alias(model_name, "champion", tracking_uri=mlflow_server).version == "1"
    # ... and a better one takes it.
    version, moved = register_best(result.pruner_dir, {**result.metrics, "val_accuracy": best + 0.25}, cfg)
    assert (version, moved) == ("3", True)
    assert registry.get_version_by_alias(model_name, "champion", tracking_uri=mlflow_server).version == "3"
