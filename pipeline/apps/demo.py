"""`stamp demo`: the whole STAMP pipeline on one machine, against the real embedded stack.

Stages (each timed, each with progress on the console):

1. ingest   the demo source suite (``jobs/configs/sources/suite_demo.yaml``: 8 class subsets and
            domain-shifted variants of 4 procedural families) and one unseen target as WebDataset
            shards + catalog on S3 (a re-run uploads nothing new);
2. pretrain the backbone on the union of the suite's datasets (Ray Train, 2 workers);
3. meta-train the STAMP pruner from it (Ray Train, 2 workers, episodes streamed from S3);
4. tune     a small Ray Tune sweep (ASHA) over the KL weight and learning rates;
5. register both candidates in MLflow; ``champion`` goes to the better meta-validation accuracy;
6. prune    the unseen target in a *fresh process* (``stamp prune --compare-full``) from
            ``models:/NAME@champion`` at 30% MACs, fine-tune briefly, and compare with the full
            network fine-tuned the same way.

The report (Markdown table, stage times, plots) is printed and logged to an MLflow run. The
`stamp demo` command routes Ray's and MLflow's own log lines to ``OUT/logs/demo.log``
(:mod:`pipeline.apps.terminal`); the terminal shows one progress line per stage
(:mod:`pipeline.apps.stages`) and the results.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console
from rich.table import Table

from pipeline.apps.stages import ray_started_here, run_meta_train_stage, run_pretrain_stage, run_tune_stage
from pipeline.apps.terminal import stage_progress
from pipeline.settings import get_settings

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pipeline.apps.terminal import Terminal

TARGET = "glyphs"  #: never a source: the pruner sees it for the first time in stage 6
EXPERIMENT = "stamp-demo"
#: the source suite every training stage uses (suites refuse the held-out TARGET)
SUITE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "sources" / "suite_demo.yaml"


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of one demo run; ``quick`` is what the end-to-end test runs."""

    name: str
    n_per_class: int  #: training images per class of the target
    test_per_class: int  #: test images per class of the target
    width: int  #: small_cnn width
    pretrain_epochs: int
    meta_steps: int
    tune_steps: int
    tune_trials: int
    finetune_epochs: int
    macs_ratio: float = 0.3
    validation_tasks: int = 4


# Steps are meta-batches of episodes.per_step (default 2) episodes: 120 steps read about the 250 episodes
# the demo read when a step was one episode, so its time stays where it was.
PRESETS = {
    "full": DemoPreset("full", n_per_class=250, test_per_class=50,
                       width=32, pretrain_epochs=3, meta_steps=120, tune_steps=30, tune_trials=2, finetune_epochs=3),
    "quick": DemoPreset("quick", n_per_class=80, test_per_class=20,
                        width=16, pretrain_epochs=1, meta_steps=10, tune_steps=6, tune_trials=2, finetune_epochs=1,
                        validation_tasks=2),
}


@dataclass
class _Stages:
    console: Console
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, title: str, fn: Callable[[str], Any], own_line: bool = False) -> Any:
        """Run and time ``fn(label)`` under a progress line; ``own_line``: ``fn`` draws its own
        (pipeline.apps.stages) or lets a child process print its progress."""
        label = f"{len(self.seconds) + 1}. {title}"
        t0 = time.perf_counter()
        if own_line:
            result = fn(label)
        else:
            with stage_progress(self.console, label):
                result = fn(label)
        self.seconds[name] = time.perf_counter() - t0
        return result


def _check_services() -> None:
    """Fail before any work when S3 or MLflow is not there, naming what to do."""
    from pipeline.registry import use_tracking_uri
    from pipeline.data.s3 import make_s3_client

    s = get_settings()
    if not s.s3_endpoint:
        raise RuntimeError("no S3 endpoint configured: run `stamp stack up` (or set STAMP_S3_ENDPOINT)")
    make_s3_client(s.s3_endpoint).head_bucket(Bucket=s.bucket)
    if not s.mlflow_uri.startswith("http"):
        return
    import mlflow

    with use_tracking_uri(s.mlflow_uri):
        mlflow.search_experiments(max_results=1)


def _sources() -> list[str]:
    """The suite's dataset names (reads and validates the suite file only)."""
    from pipeline.data import load_suite

    return [d.name for d in load_suite(SUITE).datasets]


def _ingest(preset: DemoPreset) -> list[str]:
    from pipeline.data import ingest_source, ingest_suite, load_suite

    settings = get_settings()
    report = ingest_suite(load_suite(SUITE), settings.datasets_url, catalog_url=settings.catalog_url, jobs=1,
                          progress=False)
    spec = f"procedural:{TARGET}?n={preset.n_per_class}&test={preset.test_per_class}"
    target = ingest_source(spec, settings.datasets_url, name=TARGET, shard_size=1000).name
    return [*report.built, *report.skipped, target]


def _data_section(preset: DemoPreset) -> dict[str, Any]:
    return {"sources": _sources(), "weighting": "base", "image_size": 32, "catalog_url": get_settings().catalog_url}


def _common(preset: DemoPreset, stage: str, workers: int) -> dict[str, Any]:
    return {
        "run_name": f"demo-{preset.name}-{stage}",
        "backbone": "small_cnn",
        "backbone_kwargs": {"width": preset.width},
        "data": _data_section(preset),
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        "mlflow": {"experiment": EXPERIMENT},
    }


def _meta_section(preset: DemoPreset, steps: int) -> dict[str, Any]:
    return {
        "pruner": {"embed_dim": 64, "hidden_dim": 128, "num_inducing": 16},
        "episodes": {"ways": [2, 5], "support_per_class": 10, "max_support": 100, "query_size": 32,
                     "macs_ratio_range": [0.2, 1.0]},
        "steps": steps,
        "report_every": max(1, steps // 10),
        "checkpoint_every": max(1, steps // 2),
        "validation": {"every": steps, "tasks": preset.validation_tasks, "ways": 4, "shots": 10,
                       "test_per_class": 10, "macs_ratio": preset.macs_ratio, "finetune_epochs": 1,
                       # the demo shows the pipeline: no step-0 point, no L1 reference (each costs a validation)
                       "at_start": False, "reference": None},
    }


def _pretrain(preset: DemoPreset, console: Console, title: str) -> Any:
    from pipeline.config import PretrainConfig, validate_config

    cfg = validate_config({**_common(preset, "pretrain", 2), "epochs": preset.pretrain_epochs, "batch_size": 64}, PretrainConfig, "demo")
    return run_pretrain_stage(cfg, console, title)


def _meta_train(preset: DemoPreset, backbone_dir: Path, console: Console, title: str) -> Any:
    from pipeline.config import MetaTrainConfig, validate_config

    data = {**_common(preset, "meta", 2), **_meta_section(preset, preset.meta_steps), "pretrained": str(backbone_dir)}
    return run_meta_train_stage(validate_config(data, MetaTrainConfig, "demo"), console, title)


def _tune(preset: DemoPreset, backbone_dir: Path, model_name: str, console: Console, title: str) -> Any:
    from pipeline.config import TuneConfig, validate_config

    template = {**_common(preset, "tune", 1), **_meta_section(preset, preset.tune_steps), "pretrained": str(backbone_dir)}
    template.pop("run_name")
    data = {
        "name": f"demo-{preset.name}-tune",
        "num_samples": preset.tune_trials,
        "max_concurrent_trials": 2,
        "scheduler": {"grace_period": max(1, preset.tune_steps // 2), "reduction_factor": 2},
        "search": {
            "kl_weight": {"low": 1e-5, "high": 1e-3, "log": True},
            "lr": {"low": 3e-4, "high": 3e-3, "log": True},
            "backbone_lr": {"low": 1e-5, "high": 3e-4, "log": True},
        },
        "register": True,
        "model_name": model_name,
        "meta_train": template,
    }
    return run_tune_stage(validate_config(data, TuneConfig, "demo"), console, title)


def _register_meta(result: Any, model_name: str, catalog_hash: str, preset: DemoPreset) -> tuple[str, bool]:
    from pipeline import registry
    from pipeline.training import OBJECTIVE

    metrics = {k: float(v) for k, v in result.metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}
    reg = registry.log_pruner(
        result.load_pruner(), name=model_name, metrics=metrics,
        lineage={"sources": _sources(), "catalog_hash": catalog_hash, "stage": "demo meta-train"},
        run_id=result.mlflow_run_id, experiment=EXPERIMENT,
    )
    moved = registry.promote_if_better(model_name, reg.version, OBJECTIVE) if OBJECTIVE in metrics else False
    return reg.version, moved


def _prune_fresh_process(model_name: str, preset: DemoPreset, out_dir: Path, terminal: Terminal | None) -> dict[str, Any]:
    """`stamp prune --compare-full` in a new interpreter: nothing of this process's state can leak into it.

    Its progress lines are for the user (the terminal); its report is what the demo's table
    shows, so its stdout goes where this process's stdout goes (the log file when routed).
    """
    cmd = [sys.executable, "-m", "pipeline.apps.cli", "prune", "--model", f"models:/{model_name}@champion",
           "--data", f"catalog:{TARGET}", "--macs-ratio", str(preset.macs_ratio),
           "--finetune-epochs", str(preset.finetune_epochs), "--out", str(out_dir), "--compare-full"]
    if terminal is not None and terminal.log_path is None:
        cmd.append("--verbose")
    streams = {} if terminal is None else {"stderr": terminal.err}
    subprocess.run(cmd, check=True, **streams)
    return json.loads((out_dir / "report.json").read_text())


def _full_figures(report: dict[str, Any]) -> dict[str, float]:
    """The full network's figures from the report of `stamp prune --compare-full`."""
    return {"accuracy": report["full_accuracy"], "finetune_seconds": report["full_finetune_seconds"]}


def _table(report: dict[str, Any], full: dict[str, float]) -> Table:
    lat = report["latency_ms"]
    t = Table(title=f"STAMP demo: unseen dataset '{TARGET}' ({report['num_classes']} classes), budget {report['macs_ratio_target']:.0%} MACs")
    for col in ("network", "top-1 acc", "MACs", "params", "CPU ms (b=1)", "CPU ms (b=64)", "time to prune", "time to fine-tune"):
        t.add_column(col, justify="right")
    t.add_row("full", f"{full['accuracy']:.1%}", f"{report['macs_full'] / 1e6:.2f} M", f"{report['params_full'] / 1e3:.1f} k",
              f"{lat['full_b1']:.2f}", f"{lat['full_b64']:.1f}", "-", f"{full['finetune_seconds']:.1f} s")
    t.add_row("STAMP pruned", f"{report['accuracy']:.1%}", f"{report['macs_pruned'] / 1e6:.2f} M ({report['macs_ratio']:.0%})",
              f"{report['params_pruned'] / 1e3:.1f} k", f"{lat['pruned_b1']:.2f}", f"{lat['pruned_b64']:.1f}",
              f"{report['prune_seconds']:.2f} s", f"{report['finetune_seconds']:.1f} s")
    return t


def _log_report(report: dict[str, Any], full: dict[str, float], stages: dict[str, float], markdown: str, out_dir: Path) -> None:
    import mlflow

    from pipeline.plots import plot_kept_fractions
    from pipeline.registry import ensure_experiment, use_tracking_uri
    from stamp_core import PruneSpec

    spec = PruneSpec.load(out_dir / "pruned" / "spec.json")
    with use_tracking_uri(get_settings().mlflow_uri):
        ensure_experiment(EXPERIMENT)
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name="demo-report"):
            mlflow.log_metrics({f"stage_seconds.{k}": v for k, v in stages.items()})
            mlflow.log_metrics({"pruned_accuracy": report["accuracy"], "full_accuracy": full["accuracy"],
                                "macs_ratio": report["macs_ratio"], "prune_seconds": report["prune_seconds"]})
            mlflow.log_text(markdown, "report.md")
            mlflow.log_dict(report, "prune_report.json")
            mlflow.log_figure(plot_kept_fractions({TARGET: spec}), "plots/kept_fractions.png")


def run_demo(out_dir: Path, quick: bool = False, model_name: str = "stamp-pruner",
             console: Console | None = None, out: Console | None = None, terminal: Terminal | None = None) -> dict[str, Any]:
    """Run every stage; returns the prune report, the full-net figures and the stage times.

    ``terminal``: where the fresh `stamp prune` process writes (see :mod:`pipeline.apps.terminal`).
    """
    console = console or Console(stderr=True)
    out = out or Console()
    preset = PRESETS["quick" if quick else "full"]
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(console)
    t_start = time.perf_counter()

    stages.run("check", "services (S3, MLflow)", lambda _: _check_services())
    stages.run("ingest", f"ingest the source suite {SUITE.name} + unseen target {TARGET} to S3", lambda _: _ingest(preset))
    from pipeline.data import Catalog

    catalog_hash = Catalog.load(get_settings().catalog_url).content_hash()
    from pipeline.stack import init_ray

    with ray_started_here():
        # A private local Ray on 127.0.0.1; set RAY_ADDRESS to run the same stages on a cluster.
        init_ray(get_settings().ray_address, num_cpus=2)
        pre = stages.run("pretrain", "pretrain the backbone (Ray Train, 2 workers)",
                         lambda label: _pretrain(preset, console, label), own_line=True)
        meta = stages.run("meta_train", "meta-train the STAMP pruner (Ray Train, 2 workers, episodes from S3)",
                          lambda label: _meta_train(preset, pre.backbone_dir, console, label), own_line=True)
        tuned = stages.run("tune", f"tune KL weight and learning rates (Ray Tune, {preset.tune_trials} trials, ASHA)",
                           lambda label: _tune(preset, pre.backbone_dir, model_name, console, label), own_line=True)
    version, moved = stages.run("register", "register in MLflow; champion = best meta-validation accuracy",
                                lambda _: _register_meta(meta, model_name, catalog_hash, preset))
    console.print(f"meta-train pruner: version {version} (champion {'moved' if moved else 'kept'}); "
                  f"tune best: version {tuned.registered_version} (champion {'moved' if tuned.champion_moved else 'kept'})",
                  soft_wrap=True)

    def prune_stage(label: str) -> dict[str, Any]:
        console.print(f"[bold]{label}[/]", highlight=False, soft_wrap=True)  # the child process prints the progress
        return _prune_fresh_process(model_name, preset, out_dir / "pruned", terminal)

    report = stages.run("prune", f"prune '{TARGET}' in a fresh process from models:/{model_name}@champion, "
                                 "and fine-tune the full network the same way (reference)", prune_stage, own_line=True)
    full = _full_figures(report)
    stages.seconds["total"] = time.perf_counter() - t_start

    table = _table(report, full)
    # Console.print(width=) only narrows: a console of its own keeps the table's columns unfolded
    # on a narrow terminal and off one (rich assumes 80 columns there).
    Console(file=out.file, width=max(out.width, 130), highlight=False).print(table)
    times = Table(title="stage times", show_header=True)
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for k, v in stages.seconds.items():
        times.add_row(k, f"{v:.1f}")
    out.print(times)
    rec = Console(record=True, width=140, file=io.StringIO())
    rec.print(table)
    rec.print(times)
    markdown = "```\n" + rec.export_text() + "```\n"
    (out_dir / "demo_report.md").write_text(markdown)
    result = {"report": report, "full": full, "stages": stages.seconds}
    (out_dir / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    _log_report(report, full, stages.seconds, markdown, out_dir)
    out.print(f"report: {out_dir / 'demo_report.md'}; pruned model: {out_dir / 'pruned'}; "
              f"champion: models:/{model_name}@champion", soft_wrap=True)
    return result
