"""Tests for pipeline.train: the per-worker loops in one process, gradient all-reduce, and real
Ray Train runs (2 workers, SeaweedFS catalog and checkpoint storage, MLflow server) including an
injected worker failure and resume-by-name."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import ConfigError, MetaTrainConfig, PretrainConfig
from pipeline.ingest import ingest_dataset
from pipeline.sources import build_procedural
from pipeline.train import (
    OPTIMIZER_FILE,
    STATE_FILE,
    LocalContext,
    _allreduce_grads,
    build_pruner,
    label_space,
    load_backbone_dir,
    meta_train_worker,
    prepare_meta_train,
    prepare_pretrain,
    pretrain_worker,
    run_meta_train,
    run_pretrain,
)
from stamp_core import StampPruner, prepare_images

SOURCES = ("blobs", "stripes")
LOSS_PARTS = ("loss", "ce", "kl", "macs_penalty", "expected_macs_ratio", "target_macs_ratio")


def _ingest(dest: str) -> str:
    for name in SOURCES:
        ingest_dataset(build_procedural(name, n_per_class=40, seed=0, n_test_per_class=12), dest,
                       shard_size=100, progress=False)
    return f"{dest}/catalog.json"


@pytest.fixture(scope="module")
def local_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _ingest(str(tmp_path_factory.mktemp("data")))


def _tiny(catalog_url: str, **overrides: Any) -> MetaTrainConfig:
    """A meta-train config small enough for a few steps per second on one core."""
    data: dict[str, Any] = dict(
        backbone="small_cnn",
        backbone_kwargs={"width": 8},
        steps=4,
        report_every=2,
        checkpoint_every=2,
        data={"catalog_url": catalog_url, "sources": "all"},
        episodes={"ways": [2, 4], "support_per_class": 5, "query_size": 16, "steps_per_epoch": 3},
        validation={"every": 2, "tasks": 2, "ways": 3, "shots": 3, "test_per_class": 4, "finetune_epochs": 1},
        pruner={"embed_dim": 32, "hidden_dim": 32, "num_inducing": 8},
        mlflow={"enabled": False},
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return MetaTrainConfig.model_validate(data)


# ====================================================================== in-process (no Ray)


def test_worker_loop_in_process_reports_finite_parts_and_checkpoints(local_catalog: str, tmp_path: Path) -> None:
    cfg, setup, _ = prepare_meta_train(_tiny(local_catalog))
    assert cfg.data.sources == list(SOURCES)  # "all" resolved by the driver side
    ctx = LocalContext(tmp_path / "run")
    seen_steps: list[int] = []
    last = meta_train_worker(cfg, ctx, setup, on_step=lambda step, parts: seen_steps.append(step))

    assert seen_steps == [1, 2, 3, 4]
    assert [r["step"] for r in ctx.reports] == [2, 4]
    for report in ctx.reports:
        for key in LOSS_PARTS:
            assert math.isfinite(report[key]), key
        assert 0.0 <= report["data_wait_fraction"] <= 1.0
        assert report["episodes_per_s"] > 0
        assert 0.0 < report["val_accuracy"] <= 1.0
        assert 0.0 < report["val_macs_ratio"] <= cfg.validation.macs_ratio + 1e-9
    assert last["step"] == 4 and last["checkpoint"] == "checkpoint_00000004"

    ckpt = tmp_path / "run" / "checkpoint_00000004"
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["step"] == 4 and state["config_hash"] == cfg.meta_config_hash()
    torch.load(ckpt / OPTIMIZER_FILE, weights_only=True)  # a plain state_dict
    pruner = StampPruner.load(ckpt)  # the checkpoint is a pruner directory
    x = prepare_images(build_procedural("blobs", n_per_class=5, seed=3).x_train, 32)
    spec = pruner.generate(x, macs_ratio=0.5)
    assert spec.macs_pruned <= 0.5 * spec.macs_full


def test_worker_loop_resumes_step_and_optimizer_state(local_catalog: str, tmp_path: Path) -> None:
    cfg, setup, _ = prepare_meta_train(_tiny(local_catalog, validation={"enabled": False}))
    meta_train_worker(cfg, LocalContext(tmp_path / "run"), setup)
    cfg.steps = 6
    ctx = LocalContext(tmp_path / "run")  # same directory: finds checkpoint_00000004
    meta_train_worker(cfg, ctx, setup)
    assert [(r["step"], r["start_step"]) for r in ctx.reports] == [(6, 4)]
    opt = torch.load(tmp_path / "run" / "checkpoint_00000006" / OPTIMIZER_FILE, weights_only=True)
    # Adam's per-parameter step counter continued (6), so the optimizer state was restored, not rebuilt (2).
    assert {int(s["step"]) for s in opt["state"].values()} == {6}


def test_rerunning_a_finished_run_does_nothing(local_catalog: str, tmp_path: Path) -> None:
    cfg, setup, _ = prepare_meta_train(_tiny(local_catalog, validation={"enabled": False}, steps=2))
    meta_train_worker(cfg, LocalContext(tmp_path / "run"), setup)
    ctx = LocalContext(tmp_path / "run")
    out = meta_train_worker(cfg, ctx, setup)
    assert out["already_done"] and ctx.reports == [{"step": 2, "start_step": 2, "already_done": 1}]


def test_prepare_checks_the_config_against_the_catalog(local_catalog: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.sources: \['nope'\] not in the catalog \(known: blobs, stripes\)"):
        prepare_meta_train(_tiny(local_catalog, data={"sources": ["blobs", "nope"]}))
    with pytest.raises(ConfigError, match=r"validation\.split: dataset 'blobs' has no split 'holdout'"):
        prepare_meta_train(_tiny(local_catalog, validation={"split": "holdout"}))
    with pytest.raises(ConfigError, match=r"episodes\.ways: dataset 'blobs' has 8 classes, fewer than ways min 9"):
        prepare_meta_train(_tiny(local_catalog, episodes={"ways": [9, 9], "max_support": 400}))
    with pytest.raises(ConfigError, match=r"data\.catalog_url: no catalog at"):
        prepare_meta_train(_tiny(local_catalog + ".missing"))


def test_prepare_fails_fast_on_an_unreachable_tracking_server(local_catalog: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.registry import RegistryError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(RegistryError, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        prepare_meta_train(_tiny(local_catalog, mlflow={"enabled": True}))


def test_pretrain_worker_in_process_then_meta_train_starts_from_it(local_catalog: str, tmp_path: Path) -> None:
    cfg = PretrainConfig.model_validate(dict(
        backbone="small_cnn", backbone_kwargs={"width": 8}, epochs=2, batch_size=32, eval_samples=20,
        data={"catalog_url": local_catalog, "sources": "all"}, mlflow={"enabled": False},
    ))
    cfg, setup, labels, catalog = prepare_pretrain(cfg)
    assert labels == label_space(catalog, list(SOURCES)) and labels[1]["offset"] == 8
    ctx = LocalContext(tmp_path / "pre")
    last = pretrain_worker(cfg, ctx, setup, labels)
    assert [r["epoch"] for r in ctx.reports] == [1, 2]
    assert all(math.isfinite(r["loss"]) and 0 <= r["test_accuracy"] <= 1 for r in ctx.reports)
    assert last["train_accuracy"] > 1 / 16  # better than chance over the joint 16 classes
    backbone_dir = tmp_path / "pre" / "checkpoint_00000002"
    backbone = load_backbone_dir(backbone_dir)
    assert backbone.num_classes == 16

    meta = _tiny(local_catalog, pretrained=str(backbone_dir))
    pruner = build_pruner(meta)
    for key, value in backbone.state_dict().items():
        assert torch.equal(pruner.backbone.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="pretrained: .* holds a small_cnn backbone but backbone=resnet20"):
        build_pruner(_tiny(local_catalog, pretrained=str(backbone_dir), backbone="resnet20", backbone_kwargs={}))


# ====================================================================== gradient all-reduce


def _allreduce_child(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        pruner = StampPruner.create("small_cnn", backbone_kwargs={"width": 4}, embed_dim=8, num_heads=2,
                                    num_inducing=2, hidden_dim=8)
        params = [p for p in pruner.parameters() if p.requires_grad]
        for i, p in enumerate(params):
            if i == 0:
                p.grad = None  # no rank has a gradient: must stay None
            elif i == 1:
                p.grad = torch.full_like(p, 4.0) if rank == 0 else None  # only rank 0 has one
            else:
                p.grad = torch.full_like(p, float(rank + 1))
        _allreduce_grads(pruner, world_size)
        summary = [None if p.grad is None else float(p.grad.flatten()[0]) for p in params[:3]]
        Path(out_dir, f"{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_allreduce_grads_averages_and_keeps_missing_gradients_none(tmp_path: Path) -> None:
    init_file = tmp_path / "pg-init"
    mp.spawn(_allreduce_child, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] == [None, 2.0, 1.5]


# ====================================================================== real Ray (integration)


@pytest.fixture(scope="module")
def s3_data(seaweedfs: Any) -> tuple[str, str]:
    """(bucket, catalog URL) of the procedural sources ingested into SeaweedFS."""
    bucket = f"train-{secrets.token_hex(4)}"
    seaweedfs.client().create_bucket(Bucket=bucket)
    return bucket, _ingest(f"s3://{bucket}/datasets")


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_recover_from_a_killed_worker_then_resume_by_name(
    ray_local: None, mlflow_server: str, s3_data: tuple[str, str], seaweedfs: Any, tmp_path: Path
) -> None:
    bucket, catalog_url = s3_data
    marker = tmp_path / "fault-marker"
    cfg = _tiny(
        catalog_url,
        run_name="recover",
        storage_path=f"s3://{bucket}/ray",
        steps=6,
        scaling={"num_workers": 2},
        max_failures=1,
        validation={"every": 0},  # only at the end
        fault_injection={"rank": 1, "step": 5, "marker": str(marker)},
        mlflow={"enabled": True, "experiment": "test-train"},
    )
    first = run_meta_train(cfg)

    assert marker.read_text().startswith("rank 1 exited at step 5")  # the failure really happened
    assert first.step == 6 and first.metrics["step"] == 6 and first.metrics["world_size"] == 2
    # The replacement worker group started from a checkpoint (2 or 4: whichever Ray had registered
    # when rank 1 died), not from 0.
    assert first.start_step in (2, 4)
    assert first.path.startswith(f"{bucket}/ray/recover")
    keys = {o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=bucket, Prefix="ray/recover/")["Contents"]}
    assert "ray/recover/checkpoint_00000006/pruner_state_dict.pt" in keys
    assert "ray/recover/checkpoint_00000006/optimizer.pt" in keys
    pruner = first.load_pruner()
    assert pruner.config.metadata["step"] == 6
    assert 0 < first.metrics["val_accuracy"] <= 1

    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server).get_run(first.mlflow_run_id)
    for key in (*LOSS_PARTS, "data_wait_fraction", "episodes_per_s", "peak_rss_mb", "val_accuracy"):
        assert key in run.data.metrics, key
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["scaling.num_workers"] == "2"
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in v for v in [*run.data.params.values(), *run.data.tags.values()])
    assert run.info.status == "FINISHED"

    # Resume by name: same run_name + storage_path, more steps.
    second = run_meta_train(cfg.model_copy(update={"steps": 8, "fault_injection": None}))
    assert (second.start_step, second.step) == (6, 8)
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    history = MlflowClient(mlflow_server).get_metric_history(first.mlflow_run_id, "loss")
    assert max(m.step for m in history) == 8


@pytest.mark.integration
@pytest.mark.slow
def test_run_pretrain_two_workers_ddp(ray_local: None, s3_data: tuple[str, str], tmp_path: Path) -> None:
    _, catalog_url = s3_data
    cfg = PretrainConfig.model_validate(dict(
        run_name="pre", storage_path=str(tmp_path / "ray"), backbone="small_cnn", backbone_kwargs={"width": 8},
        epochs=1, batch_size=16, eval_samples=16, scaling={"num_workers": 2},
        data={"catalog_url": catalog_url, "sources": "all"}, mlflow={"enabled": False},
    ))
    result = run_pretrain(cfg)
    assert result.epoch == 1 and math.isfinite(result.metrics["loss"])
    backbone = result.load_backbone()
    assert backbone.num_classes == 16
    meta = json.loads((result.backbone_dir / "backbone.json").read_text())
    assert [s["dataset"] for s in meta["labels"]] == list(SOURCES)
    logits = backbone(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 16) and np.isfinite(logits.detach().numpy()).all()


@pytest.mark.integration
def test_run_plots_are_logged_to_the_run(local_catalog: str, mlflow_server: str) -> None:
    """Kept fractions per held-out task, accuracy vs MACs over the curve budgets, training curves."""
    from mlflow.tracking import MlflowClient

    from pipeline.train import build_val_tasks, log_run_plots

    cfg, setup, _ = prepare_meta_train(_tiny(local_catalog, validation={"curve_ratios": [0.2, 0.6]}))
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
        _tiny(local_catalog, validation={"curve_ratios": [0.3, 1.5]})
