"""Tests for pipeline.training.meta_train: the per-worker loop in one process, the driver's checks, and a
real Ray Train run (2 workers, SeaweedFS catalog and checkpoint storage, MLflow server) with an injected
worker failure and resume-by-name."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data import OPTIMIZER_FILE, STATE_FILE, build_procedural
from pipeline.training import LocalContext, meta_train_worker, prepare_meta_train, run_meta_train
from stamp_core import StampPruner, prepare_images
from tests.pipeline.training._jobs import LOSS_PARTS, SOURCES, ingest_sources, tiny_meta_config


# ====================================================================== in-process (no Ray)


def test_worker_loop_in_process_reports_finite_parts_and_checkpoints(local_catalog: str, tmp_path: Path) -> None:
    cfg, setup, _ = prepare_meta_train(tiny_meta_config(local_catalog))
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
    # Cumulative episode counts per dataset and per base (a procedural dataset is its own base).
    per_step = cfg.episodes.per_step
    for report in ctx.reports:
        by_dataset = [report[f"episodes.{n}"] for n in SOURCES]
        assert sum(by_dataset) == report["step"] * per_step
        assert [report[f"episodes_base.{n}"] for n in SOURCES] == by_dataset
        assert 1 <= report["open_streams_peak"] <= len(SOURCES)
    assert min(ctx.reports[-1][f"episodes.{n}"] for n in SOURCES) > 0
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
    cfg, setup, _ = prepare_meta_train(tiny_meta_config(local_catalog, validation={"enabled": False}))
    meta_train_worker(cfg, LocalContext(tmp_path / "run"), setup)
    cfg.steps = 6
    ctx = LocalContext(tmp_path / "run")  # same directory: finds checkpoint_00000004
    meta_train_worker(cfg, ctx, setup)
    assert [(r["step"], r["start_step"]) for r in ctx.reports] == [(6, 4)]
    opt = torch.load(tmp_path / "run" / "checkpoint_00000006" / OPTIMIZER_FILE, weights_only=True)
    # Adam's per-parameter step counter continued (6), so the optimizer state was restored, not rebuilt (2).
    assert {int(s["step"]) for s in opt["state"].values()} == {6}


def test_rerunning_a_finished_run_does_nothing(local_catalog: str, tmp_path: Path) -> None:
    cfg, setup, _ = prepare_meta_train(tiny_meta_config(local_catalog, validation={"enabled": False}, steps=2))
    meta_train_worker(cfg, LocalContext(tmp_path / "run"), setup)
    ctx = LocalContext(tmp_path / "run")
    out = meta_train_worker(cfg, ctx, setup)
    assert out["already_done"] and ctx.reports == [{"step": 2, "start_step": 2, "already_done": 1}]


def test_prepare_checks_the_config_against_the_catalog(local_catalog: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.sources: \['nope'\] not in the catalog \(known: blobs, stripes\)"):
        prepare_meta_train(tiny_meta_config(local_catalog, data={"sources": ["blobs", "nope"]}))
    with pytest.raises(ConfigError, match=r"validation\.split: dataset 'blobs' has no split 'holdout'"):
        prepare_meta_train(tiny_meta_config(local_catalog, validation={"split": "holdout"}))
    with pytest.raises(ConfigError, match=r"episodes\.ways: dataset 'blobs' has 8 classes, fewer than ways min 9"):
        prepare_meta_train(tiny_meta_config(local_catalog, episodes={"ways": [9, 9], "max_support": 400}))
    with pytest.raises(ConfigError, match=r"data\.catalog_url: no catalog at"):
        prepare_meta_train(tiny_meta_config(local_catalog + ".missing"))


def test_prepare_fails_fast_on_an_unreachable_tracking_server(local_catalog: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.registry import RegistryError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(RegistryError, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        prepare_meta_train(tiny_meta_config(local_catalog, mlflow={"enabled": True}))


# ====================================================================== real Ray (integration)


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_recover_from_a_killed_worker_then_resume_by_name(
    ray_local: None, mlflow_server: str, s3_data: tuple[str, str], seaweedfs: Any, tmp_path: Path
) -> None:
    bucket, catalog_url = s3_data
    marker = tmp_path / "fault-marker"
    cfg = tiny_meta_config(
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
    for key in (*LOSS_PARTS, "data_wait_fraction", "episodes_per_s", "peak_rss_mb", "val_accuracy", "val_gain_vs_l1"):
        assert key in run.data.metrics, key
    # validation.at_start: the curve starts at step 0, before any update; every: 0 adds only the end
    val_steps = {m.step for m in MlflowClient(mlflow_server).get_metric_history(first.mlflow_run_id, "val_accuracy")}
    assert val_steps == {0, 6}
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["scaling.num_workers"] == "2"
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert not any(secret in v for v in [*run.data.params.values(), *run.data.tags.values()])
    assert run.info.status == "FINISHED"
    # Episode counts of the last attempt, summed over both ranks (each reads its share of the datasets).
    episodes = (6 - first.start_step) * cfg.episodes.per_step * 2
    assert sum(run.data.metrics[f"episodes.{n}"] for n in SOURCES) == episodes
    counts = MlflowClient(mlflow_server).download_artifacts(first.mlflow_run_id, "episode_counts.json", str(tmp_path))
    logged = json.loads(Path(counts).read_text())
    assert set(logged["datasets"]) == set(SOURCES) and sum(logged["datasets"].values()) == episodes
    assert logged["bases"] == logged["datasets"]

    # Resume by name: same run_name + storage_path, more steps.
    second = run_meta_train(cfg.model_copy(update={"steps": 8, "fault_injection": None}))
    assert (second.start_step, second.step) == (6, 8)
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    history = MlflowClient(mlflow_server).get_metric_history(first.mlflow_run_id, "loss")
    assert max(m.step for m in history) == 8


@pytest.mark.integration
def test_relative_paths_survive_the_trip_to_ray_workers(ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative catalog, shard and pretrained paths are pinned before anything reaches a Ray worker.

    Ray's workers do not run in the caller's working directory (here: the one Ray started in); before
    the fix a catalog ingested with ``--dest .stamp/bench/datasets`` failed there with
    ``DataQualityError: ... samples unusable``.
    """
    from pipeline.data import save_backbone
    from stamp_core import build_backbone

    monkeypatch.chdir(tmp_path)
    ingest_sources("data")  # a relative destination, as `stamp ingest --dest data` gives
    raw = json.loads(Path("data/catalog.json").read_text())
    shards = [s for e in raw["datasets"].values() for sp in e["splits"].values() for s in sp["shards"]]
    assert shards and all(Path(s["url"]).is_absolute() for s in shards)  # new ingests pin their destination
    for s in shards:  # a catalog written before that: URLs relative to where ingest ran
        s["url"] = os.path.relpath(s["url"], tmp_path)
    Path("data/catalog.json").write_text(json.dumps(raw))
    save_backbone(Path("pre"), build_backbone("small_cnn", 4, width=8), {})
    cfg = tiny_meta_config("data/catalog.json", run_name="relative", storage_path=str(tmp_path / "ray"), steps=2,
                           pretrained="pre", validation={"every": 0})
    result = run_meta_train(cfg)
    assert (result.start_step, result.step) == (0, 2)
