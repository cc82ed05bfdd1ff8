"""Tests for pipeline.training.outcomes: the plan, one task scored in process, and the table filled by real Ray
tasks into SeaweedFS, resumed without redoing recorded tasks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import ConfigError, OutcomesConfig
from pipeline.data import Catalog, save_backbone
from pipeline.training.outcomes import (
    load_outcome_table,
    plan_tasks,
    prepare_outcomes,
    run_outcomes,
    score_task,
    task_family,
)
from stamp_core import build_backbone

CANDIDATES = ["l1", "uniform", "separability_in_tilt+1"]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("backbone")
    save_backbone(directory, build_backbone("small_cnn", 4, width=8), {"epoch": 0})
    return str(directory)


def _config(catalog_url: str, backbone_dir: str, **overrides: Any) -> OutcomesConfig:
    data: dict[str, Any] = dict(
        pretrained=backbone_dir, candidates=CANDIDATES, budgets=[0.3, 0.6], seeds=[0],
        data={"catalog_url": catalog_url, "sources": ["blobs", "stripes"]},
        tasks={"draws_per_source": 2, "ways": [2, 3], "train_per_class": 8, "dev_per_class": 6, "sample_per_class": 4},
        finetune={"epochs": 1, "batch_size": 16}, mlflow={"enabled": False},
    )
    data.update(overrides)
    return OutcomesConfig.model_validate(data)


def test_the_plan_is_fixed_mixes_sources_and_draws_valid_subsets(local_catalog: str, backbone_dir: str) -> None:
    cfg = _config(local_catalog, backbone_dir)
    catalog = Catalog.load(local_catalog)
    plan = plan_tasks(cfg, catalog, ["blobs", "stripes"])
    assert plan == plan_tasks(cfg, catalog, ["blobs", "stripes"])
    assert len(plan) == 4 and len({t.task_id for t in plan}) == 4
    assert {t.dataset for t in plan[:2]} == {"blobs", "stripes"}  # the first draw covers every source
    for t in plan:
        n = catalog.get(t.dataset).num_classes
        assert 2 <= len(t.classes) <= 3 and list(t.classes) == sorted(set(t.classes)) and max(t.classes) < n
    assert plan_tasks(_config(local_catalog, backbone_dir, seed=1), catalog, ["blobs", "stripes"]) != plan


def test_the_plan_takes_the_families_in_turn_however_many_datasets_each_holds(local_catalog: str,
                                                                              backbone_dir: str) -> None:
    """A partial table must cover every family: three blobs datasets and one stripes dataset give
    blobs/stripes in the first round of each draw, not three blobs tasks first."""
    real = Catalog.load(local_catalog)
    catalog = Catalog()
    names = ["blobs-a", "blobs-b", "blobs-c", "stripes-a"]
    for name in names:
        catalog.add(dataclasses.replace(real.get(name.split("-")[0]), name=name, splits={}))
    plan = plan_tasks(_config(local_catalog, backbone_dir), catalog, names)
    families = [task_family(t.dataset) for t in plan]
    assert len(plan) == 8 and sorted(t.task_id for t in plan) == sorted(f"{n}~{d}" for n in names for d in (0, 1))
    assert set(families[:2]) == {"blobs", "stripes"} and set(families[4:6]) == {"blobs", "stripes"}
    assert families[2:4] == ["blobs", "blobs"]


def test_score_task_records_every_cell_and_the_features(local_catalog: str, backbone_dir: str) -> None:
    cfg = _config(local_catalog, backbone_dir)
    cfg, catalog, sources, _ = prepare_outcomes(cfg)
    task = plan_tasks(cfg, catalog, sources)[0]
    from pipeline.data import load_backbone_dir

    net = load_backbone_dir(Path(backbone_dir))
    threads = torch.get_num_threads()
    record = score_task(cfg, task, {"config": net.config, "state": net.state_dict(), "source": backbone_dir},
                        local_catalog, None)
    # one thread per reserved CPU inside, the caller's count after: a leak changed later tests' numerics
    assert torch.get_num_threads() == threads
    assert record["task_id"] == task.task_id and record["classes"] == list(task.classes)
    assert record["dev_images"] == 6 * len(task.classes) and record["train_images"] == 8 * len(task.classes)
    cells = {(row["r"], row["candidate"], row["seed"]) for row in record["rows"]}
    assert cells == {(r, c, 0) for r in (0.3, 0.6) for c in CANDIDATES}
    for row in record["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["macs_ratio"] <= row["r"] + 1e-9
    by = {(row["r"], row["candidate"]): row["kept_fractions"] for row in record["rows"]}
    assert by[(0.3, "l1")] != by[(0.3, "uniform")]  # different allocations, the same budget
    assert {"colourfulness", "head_confidence", "late_separability", "log_classes"} <= set(record["features"])
    assert json.loads(json.dumps(record)) == record  # a part is plain JSON


def test_datasets_the_backbone_was_pretrained_on_give_tasks_of_their_test_split(local_catalog: str, backbone_dir: str) -> None:
    from pipeline.training.outcomes import task_split

    cfg = _config(local_catalog, backbone_dir, tasks={"ways": [2, 2], "train_per_class": 8, "dev_per_class": 6,
                                                      "sample_per_class": 4, "unseen_split_for": ["blob*"]})
    assert (task_split(cfg, "blobs"), task_split(cfg, "stripes")) == ("test", "train")
    cfg, catalog, sources, _ = prepare_outcomes(cfg)
    from pipeline.data import load_backbone_dir

    net = load_backbone_dir(Path(backbone_dir))
    task = next(t for t in plan_tasks(cfg, catalog, sources) if t.dataset == "blobs")
    record = score_task(cfg, task, {"config": net.config, "state": net.state_dict(), "source": backbone_dir}, local_catalog, None)
    # 12 test images per class: a third held out to score (4), the rest to fine-tune (8)
    assert record["split"] == "test" and (record["dev_images"], record["train_images"]) == (4 * 2, 8 * 2)


def test_a_config_without_named_sources_or_with_a_bad_candidate_is_refused(local_catalog: str, backbone_dir: str) -> None:
    with pytest.raises(ValueError, match="data.sources: name the source datasets"):
        _config(local_catalog, backbone_dir, data={"catalog_url": local_catalog, "sources": "all"})
    with pytest.raises(ValueError, match="unknown mask candidate 'snip'"):
        _config(local_catalog, backbone_dir, candidates=["l1", "snip"])
    with pytest.raises(ConfigError, match="nope-\\*"):
        prepare_outcomes(_config(local_catalog, backbone_dir, data={"catalog_url": local_catalog, "sources": ["nope-*"]}))


@pytest.mark.integration
def test_ray_tasks_fill_the_table_on_s3_and_a_rerun_skips_recorded_tasks(
        ray_local: None, local_catalog: str, backbone_dir: str, s3_bucket: str) -> None:
    storage = f"s3://{s3_bucket}/outcomes"
    first = run_outcomes(_config(local_catalog, backbone_dir, storage_path=storage, run_name="t", max_tasks=3))
    assert (first.planned, first.recorded, first.new, first.failed) == (4, 3, 3, {})
    assert first.location == f"{storage}/t" and first.rows == 3 * 2 * len(CANDIDATES)
    again = run_outcomes(_config(local_catalog, backbone_dir, storage_path=storage, run_name="t"))
    assert (again.recorded, again.new) == (4, 1)  # only the task the first run left
    table = load_outcome_table(f"{storage}/t/table.jsonl")
    parts = load_outcome_table(f"{storage}/t")
    assert table == parts and len(table) == 4
    assert sorted(r["task_id"] for r in table) == sorted(t.task_id for t in plan_tasks(
        _config(local_catalog, backbone_dir), Catalog.load(local_catalog), ["blobs", "stripes"]))
    done = run_outcomes(_config(local_catalog, backbone_dir, storage_path=storage, run_name="t"))
    assert (done.recorded, done.new) == (4, 0)
    # a candidate added to the config grows every recorded task by its rows only; the old rows stay as they were
    more = [*CANDIDATES, "synflow_in_synflow"]
    grown = run_outcomes(_config(local_catalog, backbone_dir, storage_path=storage, run_name="t", candidates=more))
    assert (grown.recorded, grown.new, grown.rows) == (4, 4, 4 * 2 * len(more))
    after = {r["task_id"]: r for r in load_outcome_table(f"{storage}/t")}
    for before in table:
        rows = after[before["task_id"]]["rows"]
        assert rows[:len(before["rows"])] == before["rows"]
        assert {(row["r"], row["candidate"]) for row in rows[len(before["rows"]):]} == {(0.3, more[-1]), (0.6, more[-1])}
    assert run_outcomes(_config(local_catalog, backbone_dir, storage_path=storage, run_name="t", candidates=more)).new == 0


@pytest.mark.integration
@pytest.mark.slow
def test_the_recipe_runs_through_its_entrypoint(local_catalog: str, backbone_dir: str, tmp_path: Path) -> None:
    """``python jobs/outcomes.py --config jobs/configs/outcomes_natural.yaml`` as its header runs it, with the
    data, backbone and storage pointed at small local ones (a process of its own, a local Ray of its own)."""
    import os
    import secrets
    import subprocess
    import sys

    from pipeline.stack import procs

    repo = Path(__file__).resolve().parents[3]
    token = tmp_path / "ray-token"
    procs.write_private(token, secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "STAMP_", "AWS_"))}
    env.update(STAMP_HOME=str(tmp_path / "home"), RAY_AUTH_TOKEN_PATH=str(token))
    cmd = [sys.executable, str(repo / "jobs" / "outcomes.py"), "--config", str(repo / "jobs/configs/outcomes_natural.yaml"),
           f"data.catalog_url={local_catalog}", "data.sources=[blobs, stripes]", f"pretrained={backbone_dir}",
           f"storage_path={tmp_path / 'outcomes'}", "max_tasks=2", "budgets=[0.5]", "candidates=[l1, uniform]",
           "tasks.ways=[2, 3]", "tasks.train_per_class=8", "tasks.dev_per_class=6", "tasks.sample_per_class=4",
           "finetune.epochs=1", "mlflow.enabled=false"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["recorded"], summary["new"], summary["rows"]) == (2, 2, 4)
    assert len(load_outcome_table(str(tmp_path / "outcomes" / "outcomes-natural" / "table.jsonl"))) == 2
