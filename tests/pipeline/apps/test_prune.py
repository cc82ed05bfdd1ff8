"""pipeline.apps.prune: a pruner + a dataset -> spec, weights, verified ONNX/TorchScript exports, report."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from rich.console import Console

from pipeline.apps.prune import OutputDirError, PruneReport, load_pruned, prune_dataset
from pipeline.apps.terminal import DURATION_PATTERN
from pipeline.data import ArrayDataset, build_procedural
from pipeline.registry import RegistryError
from stamp_core import (
    PruneSpec,
    StampPruner,
    TrainConfig,
    build_backbone_from_config,
    count_macs_params,
    evaluate_accuracy,
    prepare_images,
    train_classifier,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
DATA_SPEC = "procedural:stripes?n=12&test=4"


@pytest.fixture(scope="module")
def dataset() -> ArrayDataset:
    return build_procedural("stripes", n_per_class=24, n_test_per_class=8)


@pytest.fixture(scope="module")
def pruner_dir(tmp_path_factory: pytest.TempPathFactory, dataset: ArrayDataset) -> Path:
    """A tiny pruner whose backbone saw one epoch of data, so BatchNorm statistics are real."""
    torch.manual_seed(0)
    pruner = StampPruner.create(
        "small_cnn", num_classes=dataset.num_classes, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    )
    x = prepare_images(dataset.x_train, 32)
    train_classifier(pruner.backbone, x, torch.from_numpy(dataset.y_train), TrainConfig(epochs=2, lr=0.02, batch_size=32))
    return pruner.save(tmp_path_factory.mktemp("pruner") / "pruner")


@pytest.fixture(scope="module")
def progress_shown() -> io.StringIO:
    """What the ``pruned`` run printed as progress (a console that is not a terminal, as in a CI log)."""
    return io.StringIO()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory, pruner_dir: Path, dataset: ArrayDataset,
           progress_shown: io.StringIO) -> tuple[PruneReport, Path]:
    out = tmp_path_factory.mktemp("pruned") / "out"
    console = Console(file=progress_shown, force_terminal=False, width=300)
    report = prune_dataset(str(pruner_dir), dataset, macs_ratio=0.4, finetune_epochs=1, out_dir=out, progress=console)
    return report, out


def test_progress_is_one_line_per_step_with_the_fine_tune_figures(pruned: tuple[PruneReport, Path],
                                                                   progress_shown: io.StringIO) -> None:
    report, out = pruned
    lines = progress_shown.getvalue().splitlines()
    assert [re.sub(rf" in {DURATION_PATTERN}.*", "", line) for line in lines] == [
        "ok load pruner", "ok load data", "ok prune to 0.4 of the MACs",
        f"ok fine-tune the pruned net on {report.n_train} images 1/1 epochs",
        "ok measure MACs, parameters, CPU latency", "ok export ONNX + TorchScript and check them", f"ok write {out}",
        f"done: {report.macs_ratio:.3f} of the MACs, accuracy {100 * report.accuracy:.1f}%, "
        f"{report.total_seconds:.1f} s data -> deployable",
    ]
    # The fine-tune line carries the last epoch's figures, as the report's history has them.
    last = report.history[-1]
    assert lines[3].endswith(f"· loss {last['loss']:.3f} · train acc {last['accuracy']:.1%}"), lines[3]


def test_writes_every_file_and_nothing_else(pruned: tuple[PruneReport, Path]) -> None:
    _, out = pruned
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["spec.json", "pruned_state_dict.pt", "model.onnx", "model.torchscript.pt", "report.json", "report.md",
         "kept_channels.png"]
    )


def test_spec_and_report_describe_a_net_within_budget(pruned: tuple[PruneReport, Path], dataset: ArrayDataset) -> None:
    report, out = pruned
    spec = PruneSpec.load(out / "spec.json")
    assert spec.metadata["class_names"] == dataset.class_names
    assert spec.metadata["num_classes"] == dataset.num_classes
    model = load_pruned(out)
    shape = spec.input_shape
    full = build_backbone_from_config({**spec.backbone, "num_classes": dataset.num_classes})
    assert (report.macs_pruned, report.params_pruned) == count_macs_params(model, shape)
    assert (report.macs_full, report.params_full) == count_macs_params(full, shape)
    assert report.macs_pruned / report.macs_full <= 0.4
    assert report.params_pruned < report.params_full

    saved = json.loads((out / "report.json").read_text())
    assert saved["macs_ratio"] == pytest.approx(report.macs_ratio)
    assert saved["num_classes"] == dataset.num_classes
    assert set(saved["latency_ms"]) == {"full_b1", "full_b64", "pruned_b1", "pruned_b64"}
    assert all(v > 0 for v in saved["latency_ms"].values())
    assert saved["latency_threads"] == 1
    for key in ("prune_seconds", "finetune_seconds", "total_seconds"):
        assert saved[key] > 0
    assert 0.0 <= saved["accuracy_before_finetune"] <= 1.0 and 0.0 <= saved["accuracy"] <= 1.0
    assert len(saved["history"]) == 1
    md = (out / "report.md").read_text()
    for needle in ("MACs (one image)", "CPU latency batch 64", "after fine-tune", "data in hand -> deployable"):
        assert needle in md
    # The thread count behind the latencies, and the kept-channels picture next to report.md.
    assert f"torch limited to 1 thread(s) on a machine with {os.cpu_count()} logical CPUs" in md
    assert "![channels kept per layer](kept_channels.png)" in md
    assert (out / "kept_channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["dataset_sha256"] == dataset.content_sha256() and saved["full_accuracy"] is None
    assert "| pruned | full |" not in md  # no comparison unless asked for

    # The reloaded weights are the evaluated ones: same test accuracy as the report.
    x_test = prepare_images(dataset.x_test, 32)
    assert evaluate_accuracy(model, x_test, torch.from_numpy(dataset.y_test)) == pytest.approx(report.accuracy)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_onnx_and_torchscript_reproduce_the_reloaded_model(pruned: tuple[PruneReport, Path], dataset: ArrayDataset) -> None:
    report, out = pruned
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff < 1e-4
    assert report.torchscript_max_abs_diff is not None and report.torchscript_max_abs_diff < 1e-4
    model = load_pruned(out)
    x = prepare_images(dataset.x_test[:13], 32)  # a batch size the exports never saw
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(onnx_out - ref).max() < 1e-4
    scripted = torch.jit.load(str(out / "model.torchscript.pt"), map_location="cpu")
    with torch.no_grad():
        assert (scripted(x) - torch.from_numpy(ref)).abs().max().item() < 1e-4


def test_load_pruned_rejects_weights_from_another_run(pruned: tuple[PruneReport, Path], tmp_path: Path) -> None:
    _, out = pruned
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = torch.load(copy / "pruned_state_dict.pt", weights_only=True)
    state["classifier.bias"] += 1.0
    torch.save(state, copy / "pruned_state_dict.pt")
    with pytest.raises(ValueError, match="does not belong"):
        load_pruned(copy)
    (copy / "spec.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing spec.json"):
        load_pruned(copy)


def test_failed_commit_leaves_no_spec(pruner_dir: Path, pruned: tuple[PruneReport, Path], tmp_path: Path) -> None:
    """An old spec is never left next to new weights: a commit that fails removes it first."""
    _, good = pruned
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(good / "spec.json", out / "spec.json")
    (out / "model.onnx").mkdir()  # renaming a file over a non-empty directory fails
    (out / "model.onnx" / "keep").write_text("x")
    with pytest.raises(OutputDirError, match=f"writing spec.json to {out}"):
        prune_dataset(pruner_dir, DATA_SPEC, 0.5, 0, out, progress=False, export_torchscript_model=False)
    assert not (out / "spec.json").exists()
    assert not list(out.glob(".stamp-prune-*"))


def run_prune_process(pruner_dir: Path, out: Path, prelude: str = "", prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    code = (
        f"{prelude}\n"
        "import sys\n"
        "from pipeline.apps.prune import OutputDirError, prune_dataset\n"
        "try:\n"
        f"    prune_dataset({str(pruner_dir)!r}, {DATA_SPEC!r}, 0.5, 0, {str(out)!r}, progress=False)\n"
        "except OutputDirError as exc:\n"
        "    print('OUTPUT_DIR_ERROR', exc)\n"
        "    sys.exit(3)\n"
    )
    return subprocess.run([*prefix, sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)


def test_read_only_output_dir_fails_clearly(pruner_dir: Path, tmp_path: Path, unprivileged_prefix: list[str]) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    prefix = unprivileged_prefix
    try:
        proc = run_prune_process(pruner_dir, out, prefix=prefix)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"output directory {out} is not writable" in proc.stdout
    assert list(out.iterdir()) == []


def test_full_disk_fails_clearly_and_writes_no_spec(pruner_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    # A file-size limit makes every write past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC.
    prelude = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
    )
    proc = run_prune_process(pruner_dir, out, prelude=prelude)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the disk (or quota) is full" in proc.stdout and "nothing was written" in proc.stdout
    assert list(out.iterdir()) == []


def test_bad_arguments_fail_before_any_work(pruner_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"macs_ratio=0: expected a number in \(0, 1\]"):
        prune_dataset(pruner_dir, DATA_SPEC, 0, 0, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="finetune_epochs=-1"):
        prune_dataset(pruner_dir, DATA_SPEC, 0.5, -1, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputDirError, match="cannot create output directory"):
        prune_dataset(pruner_dir, DATA_SPEC, 0.5, 0, a_file, progress=False)
    with pytest.raises(RegistryError, match="not a directory"):
        prune_dataset(tmp_path / "no-pruner", DATA_SPEC, 0.5, 0, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="cannot parse dataset spec"):
        prune_dataset(pruner_dir, "imagenet", 0.5, 0, tmp_path / "c", progress=False)
    for d in ("b", "c"):  # failures after the output check leave the directory empty
        assert list((tmp_path / d).iterdir()) == []


@pytest.mark.integration
def test_dataset_from_s3_shards(pruner_dir: Path, s3_bucket: str, tmp_path: Path) -> None:
    from pipeline.data import ingest_dataset

    ds = build_procedural("stripes", n_per_class=10, n_test_per_class=3)
    ingest_dataset(ds, f"s3://{s3_bucket}/datasets", shard_size=32, progress=False)
    report = prune_dataset(
        pruner_dir, f"s3://{s3_bucket}/datasets/{ds.name}", 0.5, 0, tmp_path / "out", progress=False,
        export_onnx_model=False, export_torchscript_model=False,
    )
    assert (report.dataset, report.n_train, report.n_test) == (ds.name, len(ds.x_train), len(ds.x_test))
    assert report.class_names == ds.class_names
    assert report.onnx_max_abs_diff is None and not (tmp_path / "out" / "model.onnx").exists()
    assert load_pruned(tmp_path / "out").num_classes == ds.num_classes


@pytest.fixture(scope="module")
def outcome_pruner_dir(tmp_path_factory: pytest.TempPathFactory, pruner_dir: Path) -> Path:
    """An outcome pruner on the same backbone whose predictor ranks uniform > l1 > tilt+1 for every task."""
    from stamp_core.candidates import FEATURE_NAMES

    trained = StampPruner.load(pruner_dir)
    pruner = StampPruner.create(trained.backbone, generator="outcome", candidates=["l1", "uniform", "tilt+1"],
                                embed_dim=8, num_heads=1, num_inducing=1, hidden_dim=8)
    pruner.generator.predictor.weight[:, 0] = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    return pruner.save(tmp_path_factory.mktemp("outcome") / "pruner")


def test_select_scores_the_proposed_masks_and_deploys_the_best(outcome_pruner_dir: Path, dataset: ArrayDataset,
                                                               tmp_path: Path) -> None:
    report = prune_dataset(str(outcome_pruner_dir), dataset, 0.4, 1, tmp_path / "out", progress=False,
                           select=3, select_epochs=1, export_onnx_model=False, export_torchscript_model=False)
    sel = report.selection
    assert sel is not None and list(sel["scores"]) == ["uniform", "l1", "tilt+1"] and sel["one_pass"] == "uniform"
    assert sel["scores"][sel["chosen"]] == max(sel["scores"].values())
    assert sel["split_images"] == round(0.2 * 24) * dataset.num_classes  # a fifth of each class, never the test split
    spec = PruneSpec.load(tmp_path / "out" / "spec.json")
    assert spec.metadata["candidate"] == sel["chosen"] and spec.macs_pruned <= 0.4 * spec.macs_full
    assert "Test-time selection: 3 candidate masks" in report.to_markdown()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["selection"]["chosen"] == sel["chosen"]
    one_pass = prune_dataset(str(outcome_pruner_dir), dataset, 0.4, 1, tmp_path / "one", progress=False,
                             export_onnx_model=False, export_torchscript_model=False)
    assert one_pass.selection is None
    assert PruneSpec.load(tmp_path / "one" / "spec.json").metadata["candidate"] == "uniform"


def test_select_needs_an_outcome_pruner(pruner_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="select=2 needs a pruner with generator 'outcome'"):
        prune_dataset(pruner_dir, DATA_SPEC, 0.5, 0, tmp_path / "a", progress=False, select=2)
    with pytest.raises(ValueError, match="select=0: expected an integer >= 1"):
        prune_dataset(pruner_dir, DATA_SPEC, 0.5, 0, tmp_path / "b", progress=False, select=0)


def test_a_many_class_sample_keeps_several_images_of_a_class_subset() -> None:
    from pipeline.apps.prune import class_balanced_sample

    y = np.repeat(np.arange(242), 16)  # Omniglot's shape: 242 characters, 16 drawings each
    one_each = class_balanced_sample(y, 20, seed=0, cap=400)
    assert len(one_each) == 242 and set(np.bincount(y[one_each])) == {1}  # the other generators: every class once
    idx = class_balanced_sample(y, 20, seed=0, cap=400, min_per_class=20)
    counts = np.bincount(y[idx], minlength=242)
    assert len(idx) == 400 and set(counts) == {0, 16} and (counts > 0).sum() == 25  # all a class holds, 25 classes
    other = class_balanced_sample(y, 20, seed=1, cap=400, min_per_class=20)
    assert set(y[other]) != set(y[idx])  # a seeded random subset of the classes
    assert np.array_equal(class_balanced_sample(y, 20, seed=0, cap=400, min_per_class=20), idx)
    few = np.repeat(np.arange(10), 30)  # the cap allows 20 of each of 10 classes: min_per_class changes nothing
    assert np.array_equal(class_balanced_sample(few, 20, 0, 400, min_per_class=20), class_balanced_sample(few, 20, 0, 400))


def test_the_outcome_pruner_reads_a_many_class_task_through_a_class_subset(outcome_pruner_dir: Path,
                                                                           pruner_dir: Path) -> None:
    """summarize_sample (what `stamp prune` and the benchmark's STAMP cells read): 20 images of each of 20 classes
    of a 100-class task, and the task's class count in the features, not one image of every class."""
    import math

    from pipeline.apps.prune import summarize_sample
    from stamp_core.candidates import FEATURE_NAMES

    pruner = StampPruner.load(outcome_pruner_dir)
    assert (pruner.min_support_per_class, pruner.config.max_support) == (20, 400)
    assert StampPruner.load(pruner_dir).min_support_per_class == 1  # the set encoders take one image of every class
    y = torch.arange(100).repeat_interleave(25)
    x = torch.randn(len(y), 3, 32, 32).clamp(-1, 1)
    summary, size = summarize_sample(pruner, x, y, per_class=20, seed=0)
    features = dict(zip(FEATURE_NAMES, summary.embedding.tolist()))
    assert size == 400
    assert features["log_classes"] == pytest.approx(math.log(100), abs=1e-5)
    assert features["log_per_class"] == pytest.approx(math.log(20), abs=1e-5)
