"""Tests for pipeline.training.outcome_fit: held-out-group choice of the penalty, the fitted pruner, its checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, FitPrunerConfig
from pipeline.data import save_backbone
from pipeline.training.outcome_fit import (
    Observations,
    choose_ridge,
    choose_shared,
    cross_validate,
    fit_outcome_pruner,
    realized,
    task_class_subset,
    task_family,
)
from stamp_core import StampPruner, build_backbone
from stamp_core.candidates import FEATURE_NAMES

CANDIDATES = ["l1", "uniform", "tilt+1"]
#: colourful families favour l1, grayscale ones uniform width: a rule that holds across families
FAMILIES = {"tin": 0.2, "blobs": 0.15, "mnist": 0.0, "stripes": 0.0}


def _records(source: str, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for fam, colour in FAMILIES.items():
        for k in range(6):
            features = {name: float(rng.normal()) for name in FEATURE_NAMES}
            features["colourfulness"] = colour + 0.01 * float(rng.random())
            rows = []
            for r in (0.1, 0.3, 0.5):
                base = {"l1": 60 + (6 if colour else -3), "uniform": 60 + (-3 if colour else 6), "tilt+1": 55}
                for c in CANDIDATES:
                    rows.append({"r": r, "candidate": c, "seed": 0, "accuracy": (base[c] + rng.normal()) / 100})
            out.append({"task_id": f"{fam}-c{k}-{k + 1}~0", "dataset": f"{fam}-c{k}-{k + 1}", "features": features,
                        "rows": rows, "backbone": source})
    return out


@pytest.fixture()
def table(tmp_path: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    save_backbone(tmp_path / "bb", build_backbone("small_cnn", 4, width=8), {"epoch": 0})
    source = str(tmp_path / "bb")
    path = tmp_path / "table.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(source)))
    return str(path), source


def test_groups_are_families_or_class_subsets() -> None:
    assert task_family("tin-c1-2-gray") == "tin" and task_class_subset("tin-c1-2-gray") == "tin-c1-2"
    assert task_class_subset("mnist-inv") == "mnist-all"


def test_held_out_families_show_what_the_features_win(table: tuple[str, str]) -> None:
    obs = Observations(_records("x"))
    assert obs.candidates == sorted(CANDIDATES) and len(obs) == 4 * 6 * 3
    groups = obs.groups("family")
    shared = realized(obs, cross_validate(obs, groups, choose_shared)).mean()
    adaptive = realized(obs, cross_validate(obs, groups, choose_ridge(0.3))).mean()
    # every family is predicted from the other three: the colourfulness rule transfers, the shared pick cannot
    assert adaptive - shared > 3.0
    assert realized(obs, cross_validate(obs, groups, choose_ridge(1e6))).mean() == pytest.approx(shared, abs=0.5)


def test_fit_outcome_pruner_saves_a_pruner_that_chooses_per_task(table: tuple[str, str], tmp_path: Path) -> None:
    path, source = table
    cfg = FitPrunerConfig(table=path, pretrained=source, ridges=[0.3, 1e6], out_dir=str(tmp_path / "p"),
                          mlflow={"enabled": False})
    result = fit_outcome_pruner(cfg)
    assert result.ridge == 0.3 and result.tasks == 24 and result.observations == 72
    assert all(v > 3.0 for v in result.cv_gain.values())
    pruner = StampPruner.load(result.pruner_dir)
    assert pruner.config.generator == "outcome" and pruner.config.metadata["ridge"] == 0.3
    gen = pruner.generator
    grey = torch.zeros(len(FEATURE_NAMES), dtype=torch.float64)
    colour = grey.clone()
    colour[FEATURE_NAMES.index("colourfulness")] = 0.2
    assert gen.choose(grey, 0.3) == "uniform" and gen.choose(colour, 0.3) == "l1"


def test_a_table_of_other_weights_is_refused(table: tuple[str, str], tmp_path: Path) -> None:
    path, _ = table
    torch.manual_seed(1)
    save_backbone(tmp_path / "other", build_backbone("small_cnn", 4, width=8), {"epoch": 0})
    cfg = FitPrunerConfig(table=path, pretrained=str(tmp_path / "other"), mlflow={"enabled": False})
    with pytest.raises(ConfigError, match="is not the backbone the table was measured on"):
        fit_outcome_pruner(cfg)


def test_the_named_recipe_runs_end_to_end_through_its_job(table: tuple[str, str], tmp_path: Path, capsys) -> None:
    """jobs/configs/stamp_outcome_natural.yaml, as its header runs it, on a small table (the only overrides:
    where the table, the backbone and the pruner are, and MLflow off)."""
    import importlib.util
    import sys

    path, source = table
    repo = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("fit_pruner_job", repo / "jobs" / "fit_pruner.py")
    job = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(repo / "jobs"))
    try:
        spec.loader.exec_module(job)
        code = job.main(["--config", str(repo / "jobs/configs/stamp_outcome_natural.yaml"), f"table={path}",
                         f"pretrained={source}", f"out_dir={tmp_path / 'p'}", "mlflow.enabled=false"])
    finally:
        sys.path.remove(str(repo / "jobs"))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["tasks"] == 24 and summary["ridge"] in (0.3, 3.0, 30.0)
    assert StampPruner.load(tmp_path / "p").config.candidates == sorted(CANDIDATES)
