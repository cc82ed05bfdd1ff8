"""The benchmark harness: the grid, per-cell resume by content, recorded failures, outputs, MLflow, configs.

A tiny grid (small_cnn, procedural glyphs and stripes as unseen targets, procedural shapes as the
ablation's source) exercises every method on both weight sets. One budget below the backbone's
reachable floor makes every pruning cell at that budget fail for a real reason, which must be
recorded while the rest completes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.apps.benchmark import (
    ACCURACY_PNG,
    BETTER_OF_L1_UNIFORM,
    MASKS_JSONL,
    RESULTS_CSV,
    RESULTS_MD,
    TIME_PNG,
    BenchmarkError,
    cost_matched,
    dev_split,
    paired_difference,
    paired_table,
    plan_cells,
    read_masks,
    read_results,
    results_markdown,
    run_benchmark,
    target_means,
)
from pipeline.config import BENCHMARK_METHODS, BenchmarkConfig, ConfigError, load_config, validate_config
from pipeline.data import load_source
from stamp_core import StampPruner, TrainConfig, build_backbone, prepare_images, train_classifier
from stamp_core.baselines import ScoringInput, register_criterion, score_l1, unregister_criterion

TARGET = "procedural:glyphs?n=12&test=6&classes=0,1,2,3"
OTHER = "procedural:stripes?n=12&test=6&classes=0,1,2"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_pruner(width: int = 8, seed: int = 0) -> StampPruner:
    torch.manual_seed(seed)
    return StampPruner.create("small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": width},
                              embed_dim=16, hidden_dim=32, num_heads=2, num_inducing=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """A saved small_cnn pruner, 'pretrained' weights of the same architecture, and the smallest reachable MACs ratio."""
    from pipeline.data import save_backbone

    root = tmp_path_factory.mktemp("models")
    pruner = _tiny_pruner()
    path = pruner.save(root / "pruner")
    save_backbone(root / "pretrained", _tiny_pruner(seed=1).backbone, {})
    s = pruner.structure
    floor = s.macs(torch.ones(s.num_groups)).item() / s.macs_full
    return path, root / "pretrained", floor


def _config(pruner_dir: Path, pretrained: Path | None = None, **overrides: Any) -> BenchmarkConfig:
    model: dict[str, Any] = {"backbone": "small_cnn", "pruner": str(pruner_dir)}
    if pretrained is not None:
        model["pretrained"] = str(pretrained)
    data: dict[str, Any] = {
        "kind": "benchmark", "name": "tiny", "models": [model],
        "targets": [{"name": "glyphs4", "data": TARGET}],
        "budgets": [0.5], "seeds": [0], "max_train_per_class": 8, "max_test_per_class": 6,
        "score_batch": 16, "finetune": {"epochs": 1, "batch_size": 16, "curve": [2]}, "bbd": {"epochs": 1, "batch_size": 16},
        "ablation": {"sources": ["procedural:shapes?n=6&test=4"], "tasks": 2, "ways": 3, "per_class": 4},
        "latency": {"repeats_b1": 1, "repeats_b64": 1}, "mlflow": {"enabled": False},
    }
    data.update(overrides)
    return validate_config(data, BenchmarkConfig)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_grid_records_every_cell_resumes_per_cell_and_records_failures(tiny: tuple[Path, Path, float], tmp_path: Path) -> None:
    pruner_dir, _, floor = tiny
    bad = round(floor / 2, 5)
    cfg = _config(pruner_dir, budgets=[0.5, bad])
    assert cfg.weights == ["meta"]  # no pretrained weights given: the pruner's own only
    cells = plan_cells(cfg)
    assert len(cells) == 1 + (len(BENCHMARK_METHODS) - 1) * 2  # full once, every other method per budget
    out = tmp_path / "out"

    first = run_benchmark(cfg, out, progress=False)
    rows = read_results(out / RESULTS_CSV)
    assert sorted(first.computed) == sorted(c.id for c in cells) and not first.skipped
    assert len(rows) == len(cells)
    by_id = {f"{r['target']}|{r['backbone']}|{r['weights']}|{r['method']}|{r['macs_ratio_target']:g}|{r['seed']}": r for r in rows}
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
            assert row["total_seconds"] == pytest.approx(row["mask_seconds"] + row["build_seconds"] + row["finetune_seconds"])
            # The curve: prototype head (0 epochs, no time), the 2-epoch branch, the headline 1-epoch fine-tune.
            assert sorted(row["curve"]) == [0, 1, 2]
            assert row["curve"][0] == (row["accuracy_before_finetune"], 0.0) and row["curve"][1][0] == row["accuracy"]
            if c.method == "full":
                assert row["macs_ratio"] == 1.0 and row["macs"] == row["macs_full"]
            else:
                assert 0.47 <= row["macs_ratio"] <= 0.5, (c.id, row["macs_ratio"])
                assert row["params"] < row["params_full"]
    assert sorted(first.failed) == sorted(c.id for c in cells if c.budget == bad)
    assert by_id["glyphs4|small_cnn|meta|bbd|0.5|0"]["method_train_seconds"] > 0
    masks = read_masks(out / MASKS_JSONL)
    assert {c.id for c in cells if c.budget == 0.5 and c.method != "full"} <= set(masks)

    md = (out / RESULTS_MD).read_text()
    for section in ("## Summary", "## 1. Mask quality", "## 2. STAMP − baseline", "## 3. Weights", "## 4. Adaptivity",
                    "## 5. Accuracy vs fine-tune epochs", "## 6. Cost-matched ranking", "## 7. All cells"):
        assert section in md, section
    assert "| meta | glyphs4 | small_cnn | 0.5 | STAMP |" in md and "| meta | glyphs4 | small_cnn | 1 (full) | full network |" in md
    assert f"| meta | glyphs4 | small_cnn | {bad:g} | SNIP | failed |" in md and "## Failed cells (9)" in md
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
        fh.write("glyphs4,small_cnn,meta,sni")  # a row torn by a crash mid-write: ignored, not fatal
    second = run_benchmark(cfg.model_copy(update={"retry_failed": False}), out, progress=False)
    assert sorted(second.computed) == sorted(f"glyphs4|small_cnn|meta|{m}|0.5|0" for m in ("snip", "stamp"))
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
    assert third.computed == ["glyphs4|small_cnn|meta|bbd|0.5|0", f"glyphs4|small_cnn|meta|bbd|{bad:g}|0"]


def test_resume_keys_on_contents_not_paths(tmp_path: Path) -> None:
    """Re-training a pruner into the same directory (or changing the target's data) recomputes its cells."""
    pruner_dir = _tiny_pruner(seed=0).save(tmp_path / "pruner")
    data = tmp_path / "target.npz"
    ds = load_source(TARGET)
    np.savez(data, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
             class_names=np.array(ds.class_names))
    cfg = _config(pruner_dir, methods=["full", "l1", "stamp"], targets=[{"name": "t", "data": f"npz:{data}"}])
    out = tmp_path / "out"
    assert len(run_benchmark(cfg, out, progress=False).computed) == 3
    assert run_benchmark(cfg, out, progress=False).computed == []  # same contents: nothing to do
    _tiny_pruner(seed=7).save(pruner_dir)  # the same path, other weights
    said: list[str] = []
    stale = run_benchmark(cfg, out, progress=said.append, report_only=True)
    assert stale.rows == [] and stale.computed == []  # the old pruner's cells are not reported as the new one's
    assert any("3 recorded cells left out of the report" in m for m in said)
    assert len(run_benchmark(cfg, out, progress=False).computed) == 3
    x = ds.x_train.copy()
    x[0] = 255 - x[0]  # one image changed
    np.savez(data, x_train=x, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test, class_names=np.array(ds.class_names))
    assert len(run_benchmark(cfg, out, progress=False).computed) == 3


def test_another_pruner_of_the_same_backbone_reuses_the_baselines_on_the_pretrained_weights(
        tiny: tuple[Path, Path, float], tmp_path: Path) -> None:
    """Baselines on the pretrained weights do not depend on the pruner: a second pruner's run reuses them from the
    first run's results.csv (``reuse_results``) and computes its own cells only; on the meta-trained weights
    everything depends on the pruner."""
    _, pretrained, _ = tiny
    first = _tiny_pruner(seed=0).save(tmp_path / "first")
    second = _tiny_pruner(seed=3).save(tmp_path / "second")
    out = tmp_path / "out"
    cfg = _config(first, pretrained, methods=["full", "l1", "stamp"], weights=["pretrained"])
    assert len(run_benchmark(cfg, out, progress=False).computed) == 3
    again = _config(second, pretrained, methods=["full", "l1", "stamp"], weights=["pretrained"],
                    reuse_results=[str(out / "results.csv")])
    result = run_benchmark(again, tmp_path / "second-out", progress=False)
    assert [c.split("|")[3] for c in result.computed] == ["stamp"] and len(result.skipped) == 2
    assert {r["method"] for r in result.rows} == {"full", "l1", "stamp"}  # copied rows are in its own table
    assert run_benchmark(again, tmp_path / "second-out", progress=False).computed == []
    notes: list[str] = []  # a run not made yet is skipped with a note: two runs that share baselines name each other
    alone = run_benchmark(_config(second, pretrained, methods=["l1"], weights=["pretrained"], budgets=[0.6],
                                  reuse_results=[str(tmp_path / "nope.csv")]), tmp_path / "third", progress=notes.append)
    assert len(alone.computed) == 1 and any("nope.csv not found" in n for n in notes)
    with pytest.raises(BenchmarkError, match="reuse_results: .*out is not a file"):
        run_benchmark(_config(second, pretrained, methods=["l1"], weights=["pretrained"], budgets=[0.6],
                              reuse_results=[str(out)]), tmp_path / "fourth", progress=False)
    both = run_benchmark(_config(first, pretrained, methods=["l1"], weights=["meta"]), out, progress=False).computed
    assert len(both) == 1 and len(run_benchmark(_config(second, pretrained, methods=["l1"], weights=["meta"]), out,
                                                progress=False).computed) == 1


def test_every_mask_runs_on_both_weight_sets_and_the_adaptivity_cells(tiny: tuple[Path, Path, float], tmp_path: Path) -> None:
    pruner_dir, pretrained, _ = tiny
    cfg = _config(pruner_dir, pretrained, methods=["full", "l1", "stamp", "stamp_mean"],
                  targets=[{"name": "glyphs4", "data": TARGET}, {"name": "stripes3", "data": OTHER}])
    assert cfg.weights == ["pretrained", "meta"] and cfg.adaptivity
    cells = plan_cells(cfg)
    methods = {(c.target, c.weights, c.method) for c in cells}
    for target, other in (("glyphs4", "stripes3"), ("stripes3", "glyphs4")):
        for w in ("pretrained", "meta"):
            assert {(target, w, m) for m in ("full", "l1", "stamp", "stamp_mean", f"stamp@{other}")} <= methods
    out = tmp_path / "out"
    result = run_benchmark(cfg, out, progress=False)
    assert not result.failed, [r["error"] for r in result.rows if r["status"] == "failed"]
    rows = {(r["target"], r["weights"], r["method"]): r for r in result.rows}
    masks = read_masks(out / MASKS_JSONL)

    def kept(target: str, weights: str, method: str) -> dict[str, list[int]]:
        return masks[f"{target}|small_cnn|{weights}|{method}|0.5|0"][1]

    # STAMP's mask depends on the pruner only: the same channels on both weight sets ...
    assert kept("glyphs4", "meta", "stamp") == kept("glyphs4", "pretrained", "stamp")
    # ... and the cross cell applies exactly the mask generated for the other target.
    assert kept("glyphs4", "meta", "stamp@stripes3") == kept("stripes3", "meta", "stamp")
    # L1 scores the weights it prunes: the two weight sets give different masks.
    assert kept("glyphs4", "meta", "l1") != kept("glyphs4", "pretrained", "l1")
    # Different weights give different networks after the same fine-tune.
    assert rows[("glyphs4", "meta", "full")]["accuracy_before_finetune"] != rows[("glyphs4", "pretrained", "full")]["accuracy_before_finetune"] \
        or rows[("glyphs4", "meta", "full")]["accuracy"] != rows[("glyphs4", "pretrained", "full")]["accuracy"]
    md = (out / RESULTS_MD).read_text()
    assert "### On meta-trained weights" in md and "### On pretrained weights" in md
    assert "| meta | glyphs4 / small_cnn | 0.5 |" in md  # adaptivity row
    assert "stripes3: " in md  # the other target's mask accuracy in the adaptivity row


def test_paired_difference_matches_a_hand_computation() -> None:
    d = paired_difference({0: 0.80, 1: 0.75, 2: 0.90, 3: 0.5}, {0: 0.79, 1: 0.73, 2: 0.87, 4: 0.1})
    # diffs 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.302653
    assert d.n == 3 and d.mean == pytest.approx(0.02) and d.std == pytest.approx(0.01)
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert (d.low, d.high) == (pytest.approx(0.02 - half, abs=1e-6), pytest.approx(0.02 + half, abs=1e-6))
    assert not d.significant and d.format() == f"+2.0 [{100 * (0.02 - half):+.1f}, {100 * (0.02 + half):+.1f}]"
    sure = paired_difference({0: 0.82, 1: 0.83, 2: 0.825}, {0: 0.80, 1: 0.80, 2: 0.80})  # diffs .02 .03 .025, sd .005
    half = 4.302653 * 0.005 / math.sqrt(3)
    assert sure.significant and sure.format() == f"**+2.5 [{100 * (0.025 - half):+.1f}, {100 * (0.025 + half):+.1f}]**"
    noisy = paired_difference({0: 0.8, 1: 0.6}, {0: 0.7, 1: 0.7})
    assert noisy.mean == pytest.approx(0.0, abs=1e-12) and not noisy.significant
    one = paired_difference({0: 0.8}, {0: 0.7})
    assert one.n == 1 and not one.significant and one.format() == "+10.0 (n=1)"
    assert paired_difference({0: 0.8}, {1: 0.7}) is None


def test_cost_matched_ranks_by_what_fits_in_stamps_time() -> None:
    def row(method: str, seed: int, mask: float, curve: dict[int, tuple[float, float]], budget: float = 0.3) -> dict[str, Any]:
        return {"target": "t", "backbone": "b", "weights": "meta", "method": method, "macs_ratio_target": budget,
                "seed": seed, "status": "ok", "accuracy": curve[max(curve)][0], "mask_seconds": mask, "build_seconds": 0.0,
                "curve": curve, "fingerprint": "x"}

    rows = []
    for seed in (0, 1):
        # Fine-tune times are pooled per budget and length: median of 3-epoch runs = 3.25 s.
        rows.append(row("stamp", seed, 1.0, {0: (0.5, 0.0), 3: (0.8, 3.0)}))  # totals 1 s and 4.25 s
        rows.append(row("l1", seed, 0.1, {0: (0.4, 0.0), 3: (0.85, 3.5)}))  # 0.1 s and 3.35 s
        rows.append(row("bbd", seed, 9.0, {0: (0.9, 0.0), 3: (0.95, 3.0)}))  # 9 s and 12.25 s: never fits
        # The same mask as STAMP's, fine-tuned while the machine was busy: it must land where STAMP does.
        rows.append(row("stamp_mean", seed, 1.0, {0: (0.5, 0.0), 3: (0.8, 9.0)}))
    [(w, t, b, r, times, reach, equal)] = cost_matched(rows)
    assert times == [1.0, 4.25]
    assert reach["stamp"] == reach["stamp_mean"] == [0.5, 0.8]
    assert reach["l1"] == [0.4, 0.85] and reach["bbd"] == [None, None]
    assert equal == {"stamp": 0.8, "l1": 0.85, "bbd": 0.95, "stamp_mean": 0.8}
    diffs = {other: d for *_, other, d in paired_table(rows)}
    assert diffs["l1"].mean == pytest.approx(-0.05) and diffs["bbd"].mean == pytest.approx(-0.15)


def test_target_means_average_complete_seeds_and_pair_stamp_with_the_better_of_l1_and_uniform() -> None:
    def row(target: str, method: str, seed: int, acc: float) -> dict[str, Any]:
        return {"target": target, "backbone": "b", "weights": "pretrained", "method": method, "macs_ratio_target": 0.3,
                "seed": seed, "status": "ok", "accuracy": acc}

    cells = {("A", "stamp"): [0.6, 0.7, 0.9], ("B", "stamp"): [0.4, 0.5],  # seed 2 lacks target B: not averaged
             ("A", "l1"): [0.5, 0.6], ("B", "l1"): [0.45, 0.45],
             ("A", "uniform"): [0.6, 0.62], ("B", "uniform"): [0.3, 0.4]}  # uniform is the better one on A only
    rows = [row(t, m, s, a) for (t, m), accs in cells.items() for s, a in enumerate(accs)]
    table = {m: (means, d) for (_, _, _, m, means, d) in target_means(rows)}
    assert table["stamp"][0] == pytest.approx({0: 0.5, 1: 0.6}) and table["stamp"][1] is None
    assert table["l1"][0] == pytest.approx({0: 0.475, 1: 0.525}) and table["l1"][1].mean == pytest.approx(0.05)
    assert table[BETTER_OF_L1_UNIFORM][0] == pytest.approx({0: 0.525, 1: 0.535})
    assert table[BETTER_OF_L1_UNIFORM][1].mean == pytest.approx(0.02) and table[BETTER_OF_L1_UNIFORM][1].n == 2
    md = results_markdown(rows)
    assert "### Mean over the targets" in md and "| better of L1 / uniform | 53.0 (n=2) | +2.0 [" in md


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_cnn trained on sklearn digits' train split (real data), saved as a pruner: the weights L1 ranks."""
    ds = load_source("digits")
    x, y = prepare_images(ds.x_train, 32), torch.from_numpy(ds.y_train)
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 10, width=16)
    train_classifier(net, x, y, TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=0))
    pruner = StampPruner.create(net, num_classes=10, image_size=32, embed_dim=16, hidden_dim=32, num_heads=2, num_inducing=4)
    return pruner.save(tmp_path_factory.mktemp("digits") / "pruner")


def test_a_planted_bad_criterion_ranks_below_l1_with_a_significant_paired_difference(digits_models: Path, tmp_path: Path) -> None:
    """The harness must tell a good mask from a bad one on real data: keeping the *least* important
    channels by L1 has to lose to L1, significantly, over 5 seeds.

    The network is trained on the target's own training split, so its channels matter for this task
    (measured: L1 - least-L1 = +21.9 [+16.3, +27.4] points at r=0.3). On a network trained on other
    classes (digits 0-4, target 5-9) least-L1 was *not* worse (-5.7 [-14.5, +3.1]): transferred, L1
    magnitude says little about what a new task needs, which is the gap STAMP is meant to fill.
    """

    @register_criterion("l1_least", "least L1 magnitude (planted)", normalize=True)
    def _least(inp: ScoringInput) -> list[torch.Tensor]:
        return [-s for s in score_l1(inp.model, inp.structure)]

    try:
        cfg = _config(digits_models, methods=["l1", "l1_least"], budgets=[0.3], seeds=[0, 1, 2, 3, 4],
                      targets=[{"name": "digits", "data": "digits"}],
                      max_train_per_class=20, max_test_per_class=30, finetune={"epochs": 1, "batch_size": 32, "curve": []})
        result = run_benchmark(cfg, tmp_path / "out", progress=False)
    finally:
        unregister_criterion("l1_least")
    assert not result.failed
    [(other, d)] = [(o, d) for *_, o, d in paired_table(result.rows, method="l1")]
    assert other == "l1_least" and d.n == 5
    assert d.significant and d.mean > 0.05, d
    assert "least L1 magnitude (planted)" in (tmp_path / "out" / RESULTS_MD).read_text()


def test_load_failures_fail_their_cells_not_the_run(tiny: tuple[Path, Path, float], tmp_path: Path) -> None:
    cfg = _config(tiny[0], methods=["full", "l1"], targets=[
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


def test_a_foreign_results_file_is_refused(tiny: tuple[Path, Path, float], tmp_path: Path) -> None:
    (tmp_path / RESULTS_CSV).write_text("a,b\n1,2\n")
    with pytest.raises(BenchmarkError, match=r"is not a results file of this benchmark version \(no column\(s\) target, backbone, weights"):
        run_benchmark(_config(tiny[0]), tmp_path, progress=False)


@pytest.mark.integration
def test_results_table_and_plots_are_logged_to_mlflow(tiny: tuple[Path, Path, float], tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    cfg = _config(tiny[0], methods=["full", "l1", "stamp"],
                  mlflow={"enabled": True, "tracking_uri": mlflow_server, "experiment": "bench-test"})
    result = run_benchmark(cfg, tmp_path / "out", progress=False)
    assert result.mlflow_run_id
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["stamp.kind"] == "benchmark" and run.data.params["budgets"] == "[0.5]"
    stamp_row = next(r for r in result.rows if r["method"] == "stamp")
    assert run.data.metrics["accuracy.glyphs4.small_cnn.meta.stamp.r0.5"] == pytest.approx(stamp_row["accuracy"])
    names = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {RESULTS_CSV, RESULTS_MD, ACCURACY_PNG, TIME_PNG, MASKS_JSONL} <= names
    local = Path(client.download_artifacts(result.mlflow_run_id, RESULTS_CSV, str(tmp_path / "dl")))
    assert local.read_bytes() == (tmp_path / "out" / RESULTS_CSV).read_bytes()


def test_config_errors_name_the_key(tiny: tuple[Path, Path, float], tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    base = {"kind": "benchmark", "models": [{"backbone": "small_cnn", "pruner": str(tiny[0])}],
            "targets": [{"name": "t", "data": "digits"}], "methods": ["full", "l1"]}
    path.write_text(yaml.safe_dump(base))
    assert load_config(path, ["seeds=[1,2]"], model=BenchmarkConfig).seeds == [1, 2]
    with pytest.raises(ConfigError, match=r"budgets: budget 0.0 is not in \(0, 1\]: a budget is pruned MACs / full MACs"):
        load_config(path, ["budgets=[0.5,0]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"methods: unknown method\(s\) \['magic'\]: expected some of full, stamp, stamp_mean, uniform"):
        load_config(path, ["methods=[full,magic]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"ablation.sources: the stamp_mean method needs source dataset specs"):
        load_config(path, ["methods=[stamp,stamp_mean]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"weights: the pretrained weight set needs models\[\].pretrained: small_cnn has none"):
        load_config(path, ["weights=[pretrained,meta]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"weights.0: Input should be 'pretrained' or 'meta'"):
        load_config(path, ["weights=[pruner]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"finetune.curve: epoch counts must be >= 0"):
        load_config(path, ["finetune.curve=[1,-3]"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"device: device 'tpu' is not supported: expected cpu, cuda or cuda:N"):
        load_config(path, ["device=tpu"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"finetune.epoch: Extra inputs are not permitted"):
        load_config(path, ["finetune.epoch=3"], model=BenchmarkConfig)
    with pytest.raises(ConfigError, match=r"models.0.backbone: Value error, unknown backbone 'resnet9000'|unknown backbone 'resnet9000'"):
        load_config(path, ["models=[{backbone: resnet9000, pruner: x}]"], model=BenchmarkConfig)


def test_shipped_benchmark_configs_validate() -> None:
    root = Path(__file__).resolve().parents[3] / "jobs" / "configs"
    real = load_config(root / "benchmark_real.yaml", model=BenchmarkConfig)
    assert [m.backbone for m in real.models] == ["resnet20"] and real.budgets == [0.3, 0.1]
    assert len(real.seeds) >= 5 and set(real.methods) == set(BENCHMARK_METHODS) and real.weights == ["pretrained", "meta"]
    assert real.max_train_per_class >= 100 and real.max_test_per_class >= 100
    few = load_config(root / "benchmark_fewshot.yaml", model=BenchmarkConfig)
    assert few.max_train_per_class <= 20
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


def test_a_mismatched_pretrained_backbone_fails_its_cells(tiny: tuple[Path, Path, float], tmp_path: Path) -> None:
    from pipeline.data import save_backbone

    wide = tmp_path / "pre16"
    save_backbone(wide, build_backbone("small_cnn", 10, width=16), {})
    cfg = _config(tiny[0], wide, methods=["full", "l1", "stamp"])
    run_benchmark(cfg, tmp_path / "b", progress=False)
    rows = {(r["weights"], r["method"]): r for r in read_results(tmp_path / "b" / RESULTS_CSV)}
    assert rows[("pretrained", "l1")]["status"] == "failed" and "BenchmarkError: models: pretrained" in rows[("pretrained", "l1")]["error"]
    assert "'width': 16" in rows[("pretrained", "l1")]["error"] and "'width': 8" in rows[("pretrained", "l1")]["error"]
    # A bad pretrained file fails the pretrained cells only; the meta-trained weight set still runs.
    assert rows[("pretrained", "full")]["status"] == "failed" and rows[("pretrained", "stamp")]["status"] == "failed"
    assert all(rows[("meta", m)]["status"] == "ok" for m in ("full", "l1", "stamp"))


def test_dev_split_scores_on_held_out_training_images_and_never_on_the_test_split() -> None:
    """evaluate_on=dev: the evaluation images are training images (50 per class, disjoint from the
    rest, which stay for training); not one test image survives; too small a class is refused."""
    from pipeline.data import ArrayDataset

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [60, 70, 80])
    x = np.stack([np.full((8, 8, 1), i % 250, np.uint8) for i in range(len(y))])  # pixel = index: traceable
    x[:, 0, 0, 0] = np.arange(len(y)) // 250
    ds = ArrayDataset("toy", x, y, np.full((9, 8, 8, 1), 255, np.uint8), rng.integers(0, 3, 9), ["a", "b", "c"])
    dev = dev_split(ds, 50)
    assert np.bincount(dev.y_test).tolist() == [50, 50, 50]
    assert np.bincount(dev.y_train).tolist() == [10, 20, 30]
    assert not (dev.x_test == 255).all(axis=(1, 2, 3)).any()  # no original test image
    key = lambda a: [bytes(v) for v in a.reshape(len(a), -1)]
    assert sorted(key(dev.x_train) + key(dev.x_test)) == sorted(key(ds.x_train))  # a partition of train
    assert not set(key(dev.x_train)) & set(key(dev.x_test))
    assert dev_split(ds, 50).x_test.tobytes() == dev.x_test.tobytes()  # fixed: the same for every method and seed
    with pytest.raises(BenchmarkError, match=r"dev_per_class=60 training images per class, but classes \{0: 60\}"):
        dev_split(ds, 60)
