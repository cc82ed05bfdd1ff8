"""Tests for pipeline.training.pretrain: the pretraining loop in one process (its checkpoint then seeds a
pruner), and a real 2-worker DDP run on Ray."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, PretrainConfig
from pipeline.data import load_backbone_dir
from pipeline.training import LocalContext, build_pruner, label_space, prepare_pretrain, pretrain_worker, run_pretrain
from tests.pipeline.training._jobs import SOURCES, tiny_meta_config


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

    meta = tiny_meta_config(local_catalog, pretrained=str(backbone_dir))
    pruner = build_pruner(meta)
    for key, value in backbone.state_dict().items():
        assert torch.equal(pruner.backbone.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="pretrained: .* holds a small_cnn backbone but backbone=resnet20"):
        build_pruner(tiny_meta_config(local_catalog, pretrained=str(backbone_dir), backbone="resnet20", backbone_kwargs={}))


@pytest.mark.integration
@pytest.mark.slow
def test_run_pretrain_two_workers_ddp(ray_local: None, s3_data: tuple[str, str], tmp_path: Path) -> None:
    _, catalog_url = s3_data
    cfg = PretrainConfig.model_validate(dict(
        run_name="pre", storage_path=str(tmp_path / "ray"), backbone="small_cnn", backbone_kwargs={"width": 8},
        epochs=1, batch_size=16, eval_samples=16, scaling={"num_workers": 2},
        data={"catalog_url": catalog_url, "sources": "all"}, mlflow={"enabled": False},
    ))
    reports: list[tuple[int, str, dict[str, Any]]] = []
    result = run_pretrain(cfg, on_report=lambda m: reports.append((os.getpid(), threading.current_thread().name, m)))
    assert result.epoch == 1 and math.isfinite(result.metrics["loss"])
    # Each epoch's report reached this (driver) process from Ray Train's controller, with the
    # figures the progress line shows.
    assert [(pid, m["epoch"]) for pid, _, m in reports] == [(os.getpid(), 1)]
    assert reports[0][1] != threading.main_thread().name
    assert reports[0][2]["loss"] == result.metrics["loss"] and reports[0][2]["samples_per_s"] > 0
    backbone = result.load_backbone()
    assert backbone.num_classes == 16
    meta = json.loads((result.backbone_dir / "backbone.json").read_text())
    assert [s["dataset"] for s in meta["labels"]] == list(SOURCES)
    logits = backbone(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 16) and np.isfinite(logits.detach().numpy()).all()


def test_has_converged_compares_the_best_of_the_window_with_the_best_before() -> None:
    from pipeline.training.pretrain import has_converged

    assert not has_converged([0.1, 0.2, 0.3], 5, 0.005)  # not enough epochs to judge
    assert has_converged([0.40, 0.50, 0.501, 0.499, 0.502, 0.503, 0.504], 5, 0.005)  # +0.4 points in 5 epochs
    assert not has_converged([0.40, 0.50, 0.501, 0.499, 0.502, 0.503, 0.505], 5, 0.005)  # +0.5 points: still learning
    assert not has_converged([0.5, 0.2, 0.3, 0.4, 0.45, 0.6], 5, 0.005)  # a new best at the end


def test_early_stopping_needs_the_test_accuracy() -> None:
    with pytest.raises(ValueError, match="early_stop_epochs needs eval_samples > 0"):
        PretrainConfig.model_validate(dict(early_stop_epochs=5, eval_samples=0))


@pytest.mark.parametrize("early_stop_from, stop_epoch", [(0.0, 2), (0.5, 3)])
def test_pretraining_stops_once_converged_and_keeps_the_curve(local_catalog: str, tmp_path: Path,
                                                              early_stop_from: float, stop_epoch: int) -> None:
    # a gain of 99 points cannot be reached: the rule fires as soon as it can judge (after epoch 2), or, with
    # early_stop_from=0.5 of 4 epochs, not before epoch 3
    cfg = PretrainConfig.model_validate(dict(
        backbone="small_cnn", backbone_kwargs={"width": 8}, epochs=4, batch_size=32, eval_samples=20,
        early_stop_epochs=1, early_stop_min_gain=0.99, early_stop_from=early_stop_from, crop_padding=4, hflip=True,
        data={"catalog_url": local_catalog, "sources": "all"}, mlflow={"enabled": False},
    ))
    cfg, setup, labels, _ = prepare_pretrain(cfg)
    ctx = LocalContext(tmp_path / "pre")
    last = pretrain_worker(cfg, ctx, setup, labels)
    assert [r["epoch"] for r in ctx.reports] == list(range(1, stop_epoch + 1))
    assert [r["converged"] for r in ctx.reports] == [0] * (stop_epoch - 1) + [1]
    state = json.loads((tmp_path / "pre" / f"checkpoint_{stop_epoch:08d}" / "state.json").read_text())
    assert state["test_accuracy_history"] == [r["test_accuracy"] for r in ctx.reports] and last["epoch"] == stop_epoch
