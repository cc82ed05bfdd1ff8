"""The `stamp` command line: the embedded stack, data, training jobs, downstream pruning, demo.

Every command resolves endpoints through :mod:`pipeline.settings` (environment first, then the
running embedded stack), so the same commands work against a real cluster, S3 and MLflow server.
Errors we expect (bad config, unreachable service, bad data) print one readable line and exit 2;
anything else keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pipeline import settings as _settings

app = typer.Typer(
    name="stamp",
    help="STAMP: meta-learned, task-adaptive structured pruning on S3 + Ray + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="The embedded local stack: SeaweedFS (S3), MLflow server, Ray head.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets in the catalog.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(datasets_app, name="datasets")
backbones_app = typer.Typer(help="Reference backbones: the repository's backbones/ folder and their MLflow models.",
                            no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")

console = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


#: More error types with a user-facing message, as (module, name): imported only when a command
#: fails (they pull in torch or MLflow), and skipped if their module cannot be imported.
LAZY_ERROR_TYPES = (
    ("pipeline.registry", "RegistryError"),
    ("pipeline.apps.prune", "PruneError"),
    ("pipeline.data", "DataQualityError"),
    ("pipeline.apps.benchmark", "BenchmarkError"),
    ("pipeline.data", "SuiteIngestError"),
)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Error types that carry a user-facing message (imported lazily: some pull in heavy deps)."""
    from pipeline.data.s3 import StorageError
    from pipeline.stack import StackError

    errors: list[type[BaseException]] = [StackError, StorageError, _settings.CredentialsError, ValueError, FileNotFoundError]
    for module, name in LAZY_ERROR_TYPES:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _friendly(fn: F) -> F:
    """Print expected errors as one line (exit 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except _expected_errors() as exc:
            console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main() -> None:
    # Before anything imports Ray: point the standard env vars at a running embedded stack.
    _settings.load_stack_credentials(_settings.state_dir_from_env())


# ----------------------------------------------------------------------------- stack
@stack_app.command("up")
@_friendly
def stack_up(
    ray: bool = typer.Option(True, "--ray/--no-ray", help="Also start a Ray head for `ray job submit`."),
    s3_port: Optional[int] = typer.Option(None, help="SeaweedFS S3 port (uses the next 4 and +10000 too)."),
    mlflow_port: Optional[int] = typer.Option(None, help="MLflow server port."),
    ray_port: Optional[int] = typer.Option(None, help="Ray GCS port."),
    ray_dashboard_port: Optional[int] = typer.Option(None, help="Ray dashboard / job API port."),
    timeout: float = typer.Option(120.0, help="Seconds to wait for each service to become healthy."),
) -> None:
    """Start the stack (idempotent) and print its endpoints."""
    from pipeline.stack import StackConfig, stack_up as _up

    overrides: dict[str, Any] = {"ray_head": ray, "timeout_s": timeout}
    for key, value in (("s3_port", s3_port), ("mlflow_port", mlflow_port), ("ray_port", ray_port), ("ray_dashboard_port", ray_dashboard_port)):
        if value is not None:
            overrides[key] = value
    info = _up(StackConfig.from_env(**overrides), progress=lambda msg: console.print(f"[dim]{msg}[/]"))
    out.print(info.summary())


@stack_app.command("cluster")
@_friendly
def stack_cluster(
    nodes: int = typer.Option(2, min=1, help="Ray nodes in all, head included."),
    cpus_per_node: int = typer.Option(1, min=1, help="Logical CPUs each node offers."),
) -> None:
    """Run a multi-node Ray cluster on 127.0.0.1 next to the running stack, until Ctrl-C.

    The head and each worker node are separate `ray start` processes with the stack's S3 and
    MLflow settings; on Ctrl-C exactly those processes are stopped. Submit with the printed command.
    """
    from pipeline.stack.cluster import run_cluster

    run_cluster(nodes, cpus_per_node)


@stack_app.command("down")
@_friendly
def stack_down() -> None:
    """Stop exactly the processes `stack up` started; data stays on disk."""
    from pipeline.stack import stack_down as _down

    stopped = _down(_settings.state_dir_from_env())
    out.print("\n".join(stopped) if stopped else "nothing of ours was running")


@stack_app.command("status")
@_friendly
def stack_status() -> None:
    """What runs where (never prints credentials)."""
    from pipeline.stack import stack_status as _status

    out.print(_status(_settings.state_dir_from_env()).summary())


# ----------------------------------------------------------------------------- data
@app.command()
@_friendly
def ingest(
    sources: Optional[list[str]] = typer.Argument(None, help="procedural:NAME | digits | npz:PATH | folder:PATH | torchvision:CLASS:ROOT"),
    suite: Optional[Path] = typer.Option(None, "--suite", help="A source suite YAML (jobs/configs/sources/): ingest all its datasets."),
    name: Optional[str] = typer.Option(None, help="Dataset name (one source only); default from the source."),
    dest: Optional[str] = typer.Option(None, help="s3://bucket/prefix or a local directory; default from settings."),
    shard_size: int = typer.Option(5000, min=1, help="Samples per shard."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Worker processes for --suite."),
) -> None:
    """Write datasets as WebDataset shards and record them in the catalog (idempotent)."""
    if suite is not None:
        if sources or name:
            raise ValueError("--suite ingests the datasets of the suite file: give no SOURCE and no --name with it")
        from pipeline.data import ingest_suite, load_suite

        spec = load_suite(suite)  # every check runs before anything is built or written
        target = dest or _settings.get_settings().datasets_url
        report = ingest_suite(spec, target, jobs=jobs, shard_size=shard_size, progress=True)
        out.print(report.summary())
        return
    if not sources:
        raise ValueError("nothing to ingest: give SOURCE... or --suite FILE")
    from pipeline.data import ingest_source

    if name and len(sources) > 1:
        raise ValueError("--name applies to a single source; ingest several sources without --name")
    target = dest or _settings.get_settings().datasets_url
    for spec_text in sources:
        entry = ingest_source(spec_text, target, name=name, shard_size=shard_size)
        samples = sum(s.samples for s in entry.splits.values())
        out.print(f"{entry.name}: {entry.num_classes} classes, {samples} samples -> {target}/{entry.name}/")


@datasets_app.command("list")
@_friendly
def datasets_list(
    catalog: Optional[str] = typer.Option(None, help="Catalog URL; default from settings."),
    base: Optional[str] = typer.Option(None, help="Only datasets derived from this suite base (e.g. mnist)."),
    recipe: Optional[str] = typer.Option(None, help="Only datasets whose recipe contains this text (e.g. rotate)."),
    limit: int = typer.Option(50, min=1, help="Rows per page."),
    page: int = typer.Option(1, min=1, help="Page number (1 = first)."),
) -> None:
    """Datasets in the catalog, a page at a time, filterable by base or recipe."""
    from pipeline.data import Catalog

    cat = Catalog.load(catalog or _settings.get_settings().catalog_url, missing_ok=True)
    found = cat.find(base=base, recipe=recipe)
    first = (page - 1) * limit
    table = Table("dataset", "base", "classes", "image", "splits", "shards", "recipe")
    table.columns[0].no_wrap = True  # names are what one copies into a config: never folded
    for e in found[first : first + limit]:
        table.add_row(e.name, e.base or "-", str(e.num_classes), "x".join(map(str, e.image_shape)),
                      ", ".join(f"{k}={v.samples}" for k, v in e.splits.items()),
                      str(sum(len(v.shards) for v in e.splits.values())), e.recipe or e.source)
    out.print(table)
    shown = f"{first + 1}-{min(first + limit, len(found))}" if first < len(found) else "none"
    pages = max(1, -(-len(found) // limit))
    out.print(f"datasets {shown} of {len(found)} (page {page} of {pages}; {len(cat.datasets)} in the catalog)")


@datasets_app.command("remove")
@_friendly
def datasets_remove(
    name: str,
    catalog: Optional[str] = typer.Option(None, help="Catalog URL; default from settings."),
    keep_shards: bool = typer.Option(False, help="Only drop the catalog entry."),
) -> None:
    """Remove a dataset from the catalog (first), then its shards."""
    from pipeline.data import remove_dataset

    remove_dataset(name, catalog or _settings.get_settings().catalog_url, delete_shards=not keep_shards)
    out.print(f"removed {name}")


# ----------------------------------------------------------------------------- backbones
@backbones_app.command("list")
@_friendly
def backbones_list() -> None:
    """The reference backbones of backbones/manifest.json, their data and validation top-1."""
    from pipeline.registry.backbones import BACKBONES_DIR, read_manifest

    table = Table("name", "backbone", "data", "epochs", "val top-1", "command")
    table.columns[0].no_wrap = True
    for e in read_manifest():
        table.add_row(e.name, str(e.architecture.get("name")), ",".join(d["name"] for d in e.datasets), str(e.epochs),
                      f"{100 * e.val_top1:.1f}%", e.command)
    out.print(table)
    out.print(f"folder: {BACKBONES_DIR}")


@backbones_app.command("add")
@_friendly
def backbones_add(
    source: str = typer.Argument(..., help="A pretrain run directory (its last checkpoint is taken) or a checkpoint."),
    name: str = typer.Option(..., "--name", help="Entry name, e.g. resnet20-tinyimagenet32: the files are NAME.json and NAME.pt."),
    command: str = typer.Option(..., "--command", help="The exact pretrain command that produced SOURCE (recorded with its recipe)."),
    notes: str = typer.Option("", "--notes", help="A line for the manifest (and the model version's description)."),
) -> None:
    """Copy a pretrained backbone into backbones/ and record it in the manifest (sha256, command, curve)."""
    from pipeline.registry.backbones import add_backbone

    e = add_backbone(source, name, command, notes=notes)
    out.print(f"added {e.name}: {e.architecture.get('name')}, {e.epochs} epochs, validation top-1 {100 * e.val_top1:.1f}%")


@backbones_app.command("register")
@_friendly
def backbones_register(
    names: Optional[list[str]] = typer.Argument(None, help="Entries to register; default: all of the manifest."),
    alias: str = typer.Option("champion", "--alias", help="Point this alias at each new version."),
) -> None:
    """Register the reference backbones in MLflow as stamp-backbone-<name> (one new version each)."""
    from pipeline.registry.backbones import register_backbones

    for uri in register_backbones(names or None, alias=alias):
        out.print(f"registered {uri} (alias {alias!r})")


# ----------------------------------------------------------------------------- jobs
def run_job(kind: str, config: Path, overrides: list[str], verbose: bool) -> Any:
    """Validate the config (fails before any cluster work), then run the job here with one progress line.

    Ray's and MLflow's own log lines go to ``logs/<kind>.log`` in the run's local directory
    (``<state dir>/checkpoints/<kind>/<run name>``) unless ``verbose``.
    """
    from pipeline import config as cfgmod

    model = {"pretrain": cfgmod.PretrainConfig, "meta_train": cfgmod.MetaTrainConfig, "tune": cfgmod.TuneConfig}[kind]
    cfg = cfgmod.load_config(config, overrides, model=model)
    from pipeline.apps import stages
    from pipeline.apps.terminal import route_output
    from pipeline.training.driver import local_root

    run = {"pretrain": stages.run_pretrain_stage, "meta_train": stages.run_meta_train_stage, "tune": stages.run_tune_stage}[kind]
    log = None if verbose else local_root(kind, cfg.name if kind == "tune" else cfg.run_name) / "logs" / f"{kind}.log"
    if log is not None:
        console.print(f"[dim]Ray and MLflow log lines go to {log} (--verbose shows them here)[/]", soft_wrap=True)
    with route_output(log) as term, stages.ray_started_here():
        from pipeline.stack import init_ray

        # The stack's head or RAY_ADDRESS when there is one, else a private Ray on 127.0.0.1.
        init_ray(_settings.get_settings().ray_address)
        progress, results = term.consoles() if log is not None else (console, out)
        result = run(cfg, progress)
        results.print(result)
    return result


_CONFIG = typer.Option(..., "--config", "-c", exists=True, dir_okay=False, help="YAML config (see jobs/configs/).")
_OVERRIDES = typer.Argument(None, help="Overrides as key=value, e.g. steps=200 optim.lr=3e-4.")
_VERBOSE = typer.Option(False, "--verbose", help="Show Ray's and MLflow's own log lines instead of writing them to the run's log file.")


@app.command()
@_friendly
def pretrain(config: Path = _CONFIG, overrides: Optional[list[str]] = _OVERRIDES, verbose: bool = _VERBOSE) -> None:
    """Reference pretraining of the backbone on the source datasets (Ray Train)."""
    run_job("pretrain", config, overrides or [], verbose)


@app.command("meta-train")
@_friendly
def meta_train(config: Path = _CONFIG, overrides: Optional[list[str]] = _OVERRIDES, verbose: bool = _VERBOSE) -> None:
    """STAMP meta-training of the pruner (Ray Train, N workers, checkpoints, resumable by name)."""
    run_job("meta_train", config, overrides or [], verbose)


@app.command()
@_friendly
def tune(config: Path = _CONFIG, overrides: Optional[list[str]] = _OVERRIDES, verbose: bool = _VERBOSE) -> None:
    """Ray Tune sweep over loss weights and learning rates; registers the best pruner."""
    run_job("tune", config, overrides or [], verbose)


@app.command()
@_friendly
def register(
    from_checkpoint: str = typer.Option(
        ..., "--from-checkpoint",
        help="A checkpoint directory, a Ray run directory (local or s3://) or a training run name.",
    ),
    name: str = typer.Option("stamp-pruner", "--name", help="Registered model name."),
    alias: Optional[str] = typer.Option(None, "--alias", help="Point this alias (e.g. champion) at the new version."),
    experiment: str = typer.Option("stamp-meta-train", help="MLflow experiment when the checkpoint's run is not on this server."),
    storage_path: Optional[str] = typer.Option(None, help="Where run names are looked up; default from settings."),
) -> None:
    """Register a pruner from a training checkpoint (e.g. after MLflow was down when the job ended)."""
    from pipeline.registry import register_from_checkpoint

    reg = register_from_checkpoint(from_checkpoint, name=name, alias=alias, experiment=experiment, storage_path=storage_path)
    moved = f", alias {alias!r} -> version {reg.version}" if alias else ""
    out.print(f"registered {reg.uri} (run {reg.run_id}){moved}")


# ----------------------------------------------------------------------------- downstream
@app.command()
@_friendly
def prune(
    model: str = typer.Option("models:/stamp-pruner@champion", help="Registry URI or a local pruner directory."),
    data: str = typer.Option(..., help="npz:PATH | folder:PATH | digits | procedural:NAME | catalog:NAME | s3://bucket/prefix/NAME"),
    macs_ratio: float = typer.Option(0.3, help="Budget: MACs of the pruned net / MACs of the full net, in (0, 1]."),
    finetune_epochs: int = typer.Option(3, min=0, help="Epochs of fine-tuning of the pruned net."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (spec.json, weights, ONNX, TorchScript, report)."),
    round_to: int = typer.Option(1, min=1, help="Keep a multiple of this many channels per layer group."),
    seed: int = typer.Option(0, help="Seed of the encoder's sample and of fine-tuning."),
    compare_full: bool = typer.Option(False, "--compare-full", help="Also fine-tune the full network the same way; report both."),
    select: int = typer.Option(1, "--select", min=1, help="Test-time selection: score the pruner's K best-ranked masks by a short fine-tune on a held-out fifth of your training images and deploy the best (outcome pruners; 1 = the one-pass mask)."),
    select_epochs: int = typer.Option(1, "--select-epochs", min=1, help="With --select: fine-tune epochs of each candidate."),
    register: Optional[str] = typer.Option(None, "--register", help="Register the pruned network in MLflow under this model name."),
    alias: Optional[str] = typer.Option(None, "--alias", help="With --register: point this alias (e.g. production) at the new version."),
    verbose: bool = typer.Option(False, "--verbose", help="Show MLflow's own log lines instead of writing them to OUT/logs/prune.log."),
) -> None:
    """Prune the registered pruner's backbone for your data, fine-tune it, export it (and register it)."""
    if alias and not register:
        raise ValueError("--alias needs --register NAME: the alias names a version of the registered pruned model")
    from pipeline.apps.prune import prune_dataset, register_pruned

    if register:
        from pipeline.registry import check_tracking_uri, resolve_tracking_uri

        check_tracking_uri(resolve_tracking_uri(None))  # before minutes of work, not after
    from pipeline.apps.terminal import route_output

    log = None if verbose else out_dir.expanduser().resolve() / "logs" / "prune.log"
    with route_output(log) as term:
        progress, results = term.consoles() if log is not None else (console, out)
        report = prune_dataset(model, data, macs_ratio, finetune_epochs, out_dir, round_to=round_to, seed=seed,
                               compare_full=compare_full, progress=progress, select=select, select_epochs=select_epochs)
        # Plain text: the report's Markdown links use brackets that rich would read as markup.
        results.print(report.to_markdown(), markup=False, highlight=False, soft_wrap=True)
        if register:
            progress.print(f"registering the pruned network as {register!r}")
            reg = register_pruned(report, register, alias)
            moved = f", alias {alias!r} -> version {reg.version}" if alias else ""
            served = f"models:/{register}@{alias}" if alias else reg.uri
            results.print(f"registered {reg.uri} (run {reg.run_id}){moved}; serve it with:\n"
                          f"  mlflow models serve -m {served} --env-manager local -h 127.0.0.1 -p 5001", soft_wrap=True)
        if log is not None:
            progress.print(f"[dim]MLflow's log lines: {log}[/]", soft_wrap=True)


@app.command()
@_friendly
def benchmark(
    config: Path = _CONFIG,
    overrides: Optional[list[str]] = _OVERRIDES,
    report_only: bool = typer.Option(False, "--report-only", help="Run no cell: summarise results.csv as it is."),
) -> None:
    """STAMP vs pruning baselines on unseen targets at matched MACs (resumable per cell)."""
    from pipeline.apps.benchmark import load_benchmark_config, run_benchmark

    cfg = load_benchmark_config(config, overrides or [])
    result = run_benchmark(cfg, progress=lambda msg: console.print(f"[dim]{msg}[/]"), report_only=report_only)
    out.print(result.markdown_path.read_text())
    out.print(f"results: {result.csv_path} ({len(result.computed)} computed, {len(result.skipped)} resumed, "
              f"{len(result.failed)} failed)" + (f"; MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else ""))


@app.command()
@_friendly
def demo(
    quick: bool = typer.Option(False, help="Smaller data and fewer steps (what the end-to-end test runs)."),
    out_dir: Path = typer.Option(Path(".stamp/demo"), "--out", help="Where the pruned model and report go."),
    model_name: str = typer.Option("stamp-pruner", help="Registered model name."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's and MLflow's own log lines instead of writing them to OUT/logs/demo.log."),
) -> None:
    """The whole pipeline on this machine: ingest, pretrain, meta-train, tune, register, prune."""
    from pipeline.apps.demo import run_demo
    from pipeline.apps.terminal import route_output

    log = None if verbose else out_dir.resolve() / "logs" / "demo.log"
    if log is not None:
        console.print(f"[dim]Ray and MLflow log lines go to {log} (--verbose shows them here)[/]", soft_wrap=True)
    with route_output(log) as term:
        progress, results = term.consoles() if log is not None else (console, out)
        run_demo(out_dir=out_dir, quick=quick, model_name=model_name, console=progress, out=results, terminal=term)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
