"""The `stamp` command line: help, config validation before any work, friendly errors."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.apps.cli import LAZY_ERROR_TYPES, app
from pipeline.apps.terminal import DURATION_PATTERN

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("stack", "ingest", "datasets", "pretrain", "meta-train", "tune", "prune", "demo"):
        assert command in result.output


def test_bad_config_key_fails_before_any_work(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kind: meta_train\nbackbone: small_cnn\nstepz: 10\n")
    result = runner.invoke(app, ["meta-train", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "stepz" in result.output


def test_bad_override_value_names_the_key(tmp_path: Path) -> None:
    cfg = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "meta_train_small.yaml"
    result = runner.invoke(app, ["meta-train", "--config", str(cfg), "optim.lr=-1"])
    assert result.exit_code == 2
    assert "optim.lr" in result.output


def test_ingest_to_local_directory_and_list(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    result = runner.invoke(app, ["ingest", "procedural:stripes?n=5&test=2", "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    assert "stripes: 8 classes, 56 samples" in result.output
    listed = runner.invoke(app, ["datasets", "list", "--catalog", str(dest / "catalog.json")])
    assert listed.exit_code == 0 and "stripes" in listed.output
    removed = runner.invoke(app, ["datasets", "remove", "stripes", "--catalog", str(dest / "catalog.json")])
    assert removed.exit_code == 0
    assert "stripes" not in runner.invoke(app, ["datasets", "list", "--catalog", str(dest / "catalog.json")]).output


def test_name_with_several_sources_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", "digits", "procedural:blobs", "--name", "x", "--dest", str(tmp_path)])
    assert result.exit_code == 2
    assert "--name applies to a single source" in result.output


def test_prune_with_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prune", "--model", str(tmp_path / "nope"), "--data", "digits", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "error:" in result.output


def test_importing_the_cli_stays_light() -> None:
    """`stamp --help` stays fast: the CLI module imports neither torch nor Ray nor MLflow."""
    code = ("import sys, pipeline.apps.cli; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-W", "ignore::FutureWarning", "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def test_every_lazily_named_error_type_exists() -> None:
    """A moved module must not silently turn its friendly errors back into tracebacks."""
    for module, name in LAZY_ERROR_TYPES:
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


@pytest.mark.integration
def test_pretrain_shows_one_progress_line_and_routes_library_lines_to_the_runs_log(
    ray_local: None, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`stamp pretrain`'s command body on the session's Ray: one line for the stage with the epoch count
    and key figures on the terminal; the library's lines in the run's 0600 log file, whose path it prints.
    (That no Ray internals reach the terminal is checked on a whole process: tests/e2e/test_demo_e2e.py.)"""
    import re
    import stat

    from pipeline.apps.cli import run_job
    from pipeline.data import build_procedural, ingest_dataset

    data = tmp_path / "data"
    for name in ("blobs", "stripes"):
        ingest_dataset(build_procedural(name, n_per_class=16, seed=0, n_test_per_class=4), str(data),
                       shard_size=100, progress=False)
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(
        "kind: pretrain\nrun_name: cli-pre\nbackbone: small_cnn\nbackbone_kwargs: {width: 8}\nepochs: 1\n"
        f"batch_size: 16\neval_samples: 8\nstorage_path: {tmp_path / 'ray'}\n"
        f"data: {{catalog_url: {data / 'catalog.json'}, sources: all}}\n"
        "scaling: {num_workers: 1}\nmlflow: {enabled: false}\n"
    )
    monkeypatch.setenv("STAMP_HOME", str(tmp_path / "home"))
    capfd.readouterr()
    result = run_job("pretrain", cfg, [], verbose=False)
    shown = capfd.readouterr()
    assert result.epoch == 1
    stage = [line for line in shown.err.splitlines() if line.startswith("ok pretrain")]
    assert len(stage) == 1 and re.fullmatch(
        rf"ok pretrain cli-pre 1/1 epochs in {DURATION_PATTERN} · loss \d\.\d{{3}} · train acc \d+\.\d% · test acc \d+\.\d% · [\d,]+ img/s",
        stage[0]), shown.err
    log = tmp_path / "home" / "checkpoints" / "pretrain" / "cli-pre" / "logs" / "pretrain.log"
    assert str(log) in " ".join(shown.err.split()) and stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "PretrainResult(" in shown.out and "PretrainResult(" not in log.read_text()  # the result is ours
