"""The benchmark harness: the grid, per-cell resume, recorded failures, outputs, MLflow, configs.

A tiny grid (small_cnn, procedural glyphs as the unseen target, procedural stripes as the ablation's
source) exercises every method. One budget below the backbone's reachable floor makes every pruning
cell at that budget fail for a real reason, which must be recorded while the rest completes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.apps.benchmark import (
    ACCURACY_PNG,
    BenchmarkError,
    RESULTS_CSV,
    RESULTS_MD,
    TIME_PNG,
    plan_cells,
    read_results,
    run_benchmark,
)
from pipeline.config import BENCHMARK_METHODS, BenchmarkConfig, ConfigError, load_config, validate_config
from pipeline.data import load_source
from stamp_core import StampPruner

TARGET = "procedural:glyphs?n=12&test=6&classes=0,1,2,3"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_pruner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A saved small_cnn pruner and the smallest MACs ratio its backbone can reach."""
    pruner = StampPruner.create("small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
                                embed_dim=16, hidden_dim=32, num_heads=2, num_inducing=4)
    path = pruner.save(tmp_path_factory.mktemp("pruner") / "pruner")
    s = pruner.structure
    import torch

    floor = s.macs(torch.ones(s.num_groups)).item() / s.macs_full
    return path, floor


def _config(pruner_dir: Path, **overrides: Any) -> BenchmarkConfig:
    data: dict[str, Any] = {
        "kind": "benchmark", "name": "tiny",
        "models": [{"backbone": "small_cnn", "pruner": str(pruner_dir)}],
        "targets": [{"name": "glyphs4", "data": TARGET}],
        "budgets": [0.5], "seeds": [0], "max_train_per_class": 8, "max_test_per_class": 6,
        "score_batch": 16, "finetune": {"epochs": 1, "batch_size": 16}, "bbd": {"epochs": 1, "batch_size": 16},
        "ablation": {"sources": ["procedural:stripes?n=6&test=4"], "tasks": 2, "ways": 3, "per_class": 4},
        "latency": {"repeats_b1": 1, "repeats_b64": 1}, "mlflow": {"enabled": False},
    }
    data.update(overrides)
    return validate_config(data, BenchmarkConfig)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_grid_records_every_cell_resumes_per_cell_and_records_failures(tiny_pruner: tuple[Path, float], tmp_path: Path) -> None:
    pruner_dir, floor = tiny_pruner
    bad = round(floor / 2, 5)
    cfg = _config(pruner_dir, budgets=[0.5, bad])
    cells = plan_cells(cfg)
    assert len(cells) == 1 + (len(BENCHMARK_METHODS) - 1) * 2  # full once, every other method per budget
    out = tmp_path / "out"

    first = run_benchmark(cfg, out, progress=False)
    rows = read_results(out / RESULTS_CSV)
    assert sorted(first.computed) == sorted(c.id for c in cells) and not first.skipped
    assert len(rows) == len(cells)
    by_id = {f"{r['target']}|{r['backbone']}|{r['method']}|{r['macs_ratio_target']:g}|{r['seed']}": r for r in rows}
    for c in cells:
        row = by_id[c.id]
        if c.budget == bad:
            # The failure is recorded with its cause; the grid went on.
            assert row["status"] == "failed", c.id
            assert "below the smallest reachable ratio" in row["error"], row["error"]
            assert row["accuracy"] is None
        else:
            assert row["status"] == "ok", (c.id, row["error"])
            assert 0.0 <= row["accuracy"] <= 1.0 and row["n_test"] == 24 and row["num_classes"] == 4
            assert row["latency_b1_ms"] > 0 and row["latency_b64_ms"] > 0 and row["finetune_seconds"] > 0
            assert row["total_seconds"] == pytest.approx(row["mask_seconds"] + row["finetune_seconds"])
            if c.method == "full":
                assert row["macs_ratio"] == 1.0 and row["macs"] == row["macs_full"]
            else:
                assert 0.47 <= row["macs_ratio"] <= 0.5, (c.id, row["macs_ratio"])
                assert row["params"] < row["params_full"]
    assert sorted(first.failed) == sorted(c.id for c in cells if c.budget == bad)
    assert by_id["glyphs4|small_cnn|bbd|0.5|0"]["method_train_seconds"] > 0
    assert by_id["glyphs4|small_cnn|l1|0.5|0"]["weights"] == "pruner"  # no pretrained given

    md = (out / RESULTS_MD).read_text()
    assert "| glyphs4 | small_cnn | 0.5 | STAMP |" in md and "| glyphs4 | small_cnn | 1 (full) | full network |" in md
    assert f"| glyphs4 | small_cnn | {bad:g} | SNIP | failed |" in md and "## Failed cells (9)" in md
    for png in (ACCURACY_PNG, TIME_PNG):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    # Resume: drop two finished rows; only those two are computed again (failed ones stay recorded).
    raw = _csv_rows(out / RESULTS_CSV)
    dropped = [r for r in raw if r["method"] in ("snip", "stamp") and r["status"] == "ok"]
    kept = [r for r in raw if r not in dropped]
    with (out / RESULTS_CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(raw[0]))
        writer.writeheader()
        writer.writerows(kept)
        fh.write("glyphs4,small_cnn,sni")  # a row torn by a crash mid-write: ignored, not fatal
    second = run_benchmark(cfg.model_copy(update={"retry_failed": False}), out, progress=False)
    assert sorted(second.computed) == sorted(f"glyphs4|small_cnn|{m}|0.5|0" for m in ("snip", "stamp"))
    assert len(second.skipped) == len(cells) - 2
    after = _csv_rows(out / RESULTS_CSV)
    # Skipped cells were not recomputed: their rows (timings, finish time) are byte for byte the same.
    assert after[: len(kept)] == kept and len(after) == len(cells) + 1
    assert after[len(kept)]["method"] == "sni" and after[len(kept) + 1]["method"] in ("snip", "stamp")

    # --report-only summarises without running anything, even with cells left to do.
    (out / RESULTS_MD).unlink()
    summary = run_benchmark(cfg.model_copy(update={"seeds": [0, 1]}), out, progress=False, report_only=True)
    assert summary.computed == [] and (out / RESULTS_MD).is_file() and len(summary.rows) == len(cells)
    assert _csv_rows(out / RESULTS_CSV) == after

    # A changed setting that the numbers depend on invalidates exactly the cells it affects.
    third = run_benchmark(cfg.model_copy(update={"retry_failed": False, "bbd": cfg.bbd.model_copy(update={"epochs": 2})}),
                          out, progress=False)
    assert third.computed == ["glyphs4|small_cnn|bbd|0.5|0", f"glyphs4|small_cnn|bbd|{bad:g}|0"]


def test_load_failures_fail_their_cells_not_the_run(tiny_pruner: tuple[Path, float], tmp_path: Path) -> None:
    pruner_dir, _ = tiny_pruner
    cfg = _config(pruner_dir, methods=["full", "l1"], targets=[
        {"name": "glyphs4", "data": TARGET},
        {"name": "missing", "data": f"npz:{tmp_path / 'nope.npz'}"},
    ])
    result = run_benchmark(cfg, tmp_path / "out", progress=False)
    rows = {(r["target"], r["method"]): r for r in read_results(tmp_path / "out" / RESULTS_CSV)}
    assert rows[("glyphs4", "full")]["status"] == "ok" and rows[("glyphs4", "l1")]["status"] == "ok"
    for method in ("full", "l1"):
        assert rows[("missing", method)]["status"] == "failed"
        assert rows[("missing", method)]["error"] == f"FileNotFoundError: {tmp_path / 'nope.npz'}: no such .npz file"
    assert len(result.failed) == 2


def test_a_foreign_results_file_is_refused(tiny_pruner: tuple[Path, float], tmp_path: Path) -> None:
    (tmp_path / RESULTS_CSV).write_text("a,b\n1,2\n")
    with pytest.raises(BenchmarkError, match=r"is not a benchmark results file \(no column\(s\) target, backbone"):
        run_benchmark(_config(tiny_pruner[0]), tmp_path, progress=False)


@pytest.mark.integration
def test_results_table_and_plots_are_logged_to_mlflow(tiny_pruner: tuple[Path, float], tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    cfg = _config(tiny_pruner[0], methods=["full", "l1", "stamp"],
                  mlflow={"enabled": True, "tracking_uri": mlflow_server, "experiment": "bench-test"})
    result = run_benchmark(cfg, tmp_path / "out", progress=False)
    assert result.mlflow_run_id
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["stamp.kind"] == "benchmark" and run.data.params["budgets"] == "[0.5]"
    stamp_row = next(r for r in result.rows if r["method"] == "stamp")
    assert run.data.metrics["accuracy.glyphs4.small_cnn.stamp.r0.5"] == pytest.approx(stamp_row["accuracy"])
    names = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {RESULTS_CSV, RESULTS_MD, ACCURACY_PNG, TIME_PNG} <= names
    local = Path(client.download_artifacts(result.mlflow_run_id, RESULTS_CSV, str(tmp_path / "dl")))
    assert local.read_bytes() == (tmp_path / "out" / RESULTS_CSV).read_bytes()


def test_config_errors_name_the_key(tiny_pruner: tuple[Path, float], tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    base = {"kind": "benchmark", "models": [{"backbone": "small_cnn", "pruner": str(tiny_pruner[0])}],
            "targets": [{"name": "t", "data": "digits"}], "methods": ["full", "l1"]}
    path.write_text(yaml.safe_dump(base))
    assert load_config(path, ["seeds=[1,2]"], model=BenchmarkConfig).seeds == [1, 2]
    with pytest.raises(ConfigError, match=r"budgets: budget 0.0 is not in \(0, 1\]: a budget is pruned MACs / full MACs"):
        load_config(path, ["budgets=[0.5,0]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"methods: unknown method\(s\) \['magic'\]"):
        load_config(path, ["methods=[full,magic]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"ablation.sources: the stamp_mean method needs source dataset specs"):
        load_config(path, ["methods=[stamp,stamp_mean]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"device: device 'tpu' is not supported: expected cpu, cuda or cuda:N"):
        load_config(path, ["device=tpu"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"finetune.epoch: Extra inputs are not permitted"):
        load_config(path, ["finetune.epoch=3"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"models.0.backbone: Value error, unknown backbone 'resnet9000'|unknown backbone 'resnet9000'"):
        load_config(path, ["models=[{backbone: resnet9000, pruner: x}]"], model=BenchmarkConfig)


def test_shipped_benchmark_configs_validate() -> None:
    root = Path(__file__).resolve().parents[3] / "jobs" / "configs"
    real = load_config(root / "benchmark_real.yaml", model=BenchmarkConfig)
    assert [m.backbone for m in real.models] == ["resnet20", "vgg11"] and real.budgets == [0.5, 0.3, 0.1]
    assert len(real.seeds) >= 3 and set(real.methods) == set(BENCHMARK_METHODS)
    gpu = load_config(root / "benchmark_gpu.yaml", model=BenchmarkConfig)
    assert {m.backbone for m in gpu.models} == {"vgg19", "resnet18"}


def test_class_subset_spec_relabels_and_keeps_names() -> None:
    full = load_source("procedural:glyphs?n=6&test=2")
    sub = load_source("procedural:glyphs?n=6&test=2&classes=7,2")
    assert sub.name == "glyphs-c7-2" and sub.class_names == [full.class_names[7], full.class_names[2]]
    np.testing.assert_array_equal(sub.x_train, full.x_train[np.isin(full.y_train, [7, 2])])
    np.testing.assert_array_equal(sub.y_train, np.where(full.y_train[np.isin(full.y_train, [7, 2])] == 7, 0, 1))
    assert len(sub.x_test) == 4
    with pytest.raises(ValueError, match=r"classes \[12\] do not exist: dataset 'glyphs' has class ids 0..9"):
        load_source("procedural:glyphs?n=2&classes=1,12")
    with pytest.raises(ValueError, match=r"classes='1,1' is not a comma-separated list of distinct class ids"):
        load_source("digits?classes=1,1")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n'\]; accepted: classes"):
        load_source("digits?n=3")


def test_cli_and_job_refuse_a_bad_config_before_any_work(tmp_path: Path) -> None:
    import importlib.util
    import sys

    from typer.testing import CliRunner

    from pipeline.apps.cli import app

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kind: benchmark\nmodels: [{backbone: small_cnn, pruner: x}]\ntargets: [{name: t, data: digits}]\nseedz: [1]\n")
    result = CliRunner().invoke(app, ["benchmark", "--config", str(cfg)])
    assert result.exit_code == 2 and "seedz" in result.output and "Extra inputs are not permitted" in result.output
    root = Path(__file__).resolve().parents[3] / "jobs"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("bench_job_under_test", root / "benchmark.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)  # type: ignore[union-attr]
        assert job.main(["--config", str(cfg)]) == 2
    finally:
        sys.path.remove(str(root))


def test_baselines_prune_the_pretrained_weights_and_a_mismatched_backbone_fails_its_cells(
    tiny_pruner: tuple[Path, float], tmp_path: Path
) -> None:
    from pipeline.data import save_backbone
    from stamp_core import build_backbone

    good, wide = tmp_path / "pre8", tmp_path / "pre16"
    save_backbone(good, build_backbone("small_cnn", 10, width=8), {})
    save_backbone(wide, build_backbone("small_cnn", 10, width=16), {})
    for pretrained, out in ((good, "a"), (wide, "b")):
        cfg = _config(tiny_pruner[0], methods=["full", "l1", "stamp"],
                      models=[{"backbone": "small_cnn", "pruner": str(tiny_pruner[0]), "pretrained": str(pretrained)}])
        run_benchmark(cfg, tmp_path / out, progress=False)
    rows = {r["method"]: r for r in read_results(tmp_path / "a" / RESULTS_CSV)}
    assert rows["l1"]["weights"] == "pretrained" and rows["full"]["weights"] == "pretrained"
    assert rows["stamp"]["weights"] == "pruner" and all(r["status"] == "ok" for r in rows.values())
    rows = {r["method"]: r for r in read_results(tmp_path / "b" / RESULTS_CSV)}
    assert rows["l1"]["status"] == "failed" and "BenchmarkError: models: pretrained" in rows["l1"]["error"]
    assert "'width': 16" in rows["l1"]["error"] and "'width': 8" in rows["l1"]["error"]

