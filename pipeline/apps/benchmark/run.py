"""Running the grid: load models and targets once, run each missing cell through the one prune path.

Every cell, from data in hand (the decoded training subset of the target):

1. obtain a mask (timed, :mod:`.masks`): a criterion's scores + the shared calibration, STAMP's one
   pass, or Beta-Bernoulli dropout's own training;
2. :func:`stamp_core.prune_and_finetune`: the physically pruned copy of the cell's weights, BatchNorm
   recalibrated on the target's training images, a prototype head, then the same fine-tune for every
   method; copies of the same start are fine-tuned for each length in ``finetune.curve`` (the
   accuracy-vs-epochs view);
3. top-1 on the target's fixed test subset, MACs, parameters and CPU latency at a fixed thread count.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import BenchmarkConfig, BenchmarkModel, BenchmarkTarget
from pipeline.data import ArrayDataset
from stamp_core import Backbone, StampPruner, TaskSummary, TrainConfig, build_backbone_from_config, count_macs_params, measure_latency, prepare_images, prune_and_finetune, task_classes, torch_threads

from pipeline.apps.benchmark.cells import (
    CROSS_PREFIX,
    MASKS_JSONL,
    RESULTS_CSV,
    COLUMNS,
    BenchmarkError,
    CellKey,
    append_mask,
    append_row,
    fingerprint,
    hash_arrays,
    hash_state_dict,
    plan_cells,
    read_results,
    row_id,
    csv_value,
    parse_row,
)
from pipeline.apps.benchmark.masks import MaskContext, obtain_mask
from pipeline.apps.benchmark.report import log_to_mlflow, write_report


@dataclass
class BenchmarkResult:
    """What a benchmark run produced."""

    out_dir: Path
    csv_path: Path
    markdown_path: Path
    plots: list[Path]
    computed: list[str]  #: ids of the cells computed by this call
    skipped: list[str]  #: ids of the cells found done in results.csv
    failed: list[str]  #: ids of the cells that failed in this call
    rows: list[dict[str, Any]] = field(default_factory=list)  #: the planned cells' latest rows
    mlflow_run_id: str | None = None
    seconds: float = 0.0


@dataclass
class _Model:
    spec: BenchmarkModel
    pruner: StampPruner
    weights: dict[str, Backbone]  #: "meta" (the pruner's backbone) and "pretrained" when configured
    hashes: dict[str, str]  #: content hashes: "pruner" and "pretrained"
    input_shape: tuple[int, int, int]
    mean_embedding: TaskSummary | None = None


@dataclass
class _Target:
    spec: Any
    data: Any  #: ArrayDataset
    test_idx: np.ndarray
    hash: str
    prepared: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def resolved_out_dir(cfg: BenchmarkConfig) -> Path:
    """``cfg.out_dir``, else ``STATE_DIR/benchmark/<name>``."""
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    from pipeline.settings import get_settings

    return get_settings().state_dir / "benchmark" / cfg.name


def _pruner_location(location: str) -> str:
    """A Ray meta-train run directory resolves to its latest checkpoint (a pruner directory)."""
    p = Path(location).expanduser()
    if "://" in location or not p.is_dir() or (p / "pruner.json").is_file():
        return location
    checkpoints = sorted(c for c in p.glob("checkpoint_*") if (c / "pruner.json").is_file())
    return str(checkpoints[-1]) if checkpoints else location


def _load_model(spec: BenchmarkModel) -> _Model:
    from pipeline.apps.prune import resolve_pruner

    pruner, _ = resolve_pruner(_pruner_location(spec.pruner))
    pruner.eval()
    name = pruner.backbone.config["name"]
    if name != spec.backbone:
        raise BenchmarkError(f"models: pruner {spec.pruner} is for backbone {name!r}, but the config says {spec.backbone!r}")
    return _Model(spec, pruner, {"meta": pruner.backbone}, {"pruner": hash_state_dict(pruner)}, pruner.input_shape)


def _load_pretrained(m: _Model) -> _Model:
    """Add the pretrained weight set to ``m`` (its own load step: a bad file fails only the pretrained cells)."""
    spec = m.spec
    if not spec.pretrained:
        raise BenchmarkError(f"models: {spec.backbone} has no `pretrained` weights but weights lists 'pretrained'")
    from pipeline.registry.backbones import load_backbone

    base = load_backbone(spec.pretrained)  # models:/ (settings' tracking URI), a run or checkpoint directory
    mine = {k: v for k, v in base.config.items() if k != "num_classes"}
    theirs = {k: v for k, v in m.pruner.backbone.config.items() if k != "num_classes"}
    if mine != theirs:
        raise BenchmarkError(f"models: pretrained {spec.pretrained} is a {mine} backbone but the pruner's is {theirs}")
    m.weights["pretrained"] = base.eval()
    m.hashes["pretrained"] = hash_state_dict(base)
    return m


def per_class_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``per_class`` seeded random images of every class (all of them when None): with a
    cell's seed, the training images a benchmark cell has in hand."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def dev_split(ds: ArrayDataset, per_class: int) -> ArrayDataset:
    """``ds`` with its test split replaced by ``per_class`` training images per class (fixed seed) and
    its train split by the remaining ones; the original test images are dropped, never read.

    Raises:
        BenchmarkError: a class has too few training images to keep some for training.
    """
    short = {int(c): int(n) for c, n in zip(*np.unique(ds.y_train, return_counts=True)) if n <= per_class}
    if short:
        raise BenchmarkError(f"target {ds.name!r}: evaluate_on=dev holds out dev_per_class={per_class} training images "
                             f"per class, but classes {short} (class: images) have no more than that; lower dev_per_class")
    dev = per_class_subset(ds.y_train, per_class, 54321)
    rest = np.setdiff1d(np.arange(len(ds.y_train)), dev)
    return dataclasses.replace(ds, x_train=ds.x_train[rest], y_train=ds.y_train[rest],
                               x_test=ds.x_train[dev], y_test=ds.y_train[dev])


def _load_target(spec: BenchmarkTarget, cfg: BenchmarkConfig) -> _Target:
    from pipeline.apps.prune import resolve_data

    ds = resolve_data(spec.data)
    if cfg.evaluate_on == "dev":
        ds = dev_split(ds, cfg.dev_per_class)
    if len(ds.x_test) == 0:
        raise BenchmarkError(f"target {spec.name!r} ({spec.data}) has no test split: a benchmark scores on held-out images")
    present = np.unique(ds.y_train)
    if len(present) != ds.num_classes:
        raise BenchmarkError(f"target {spec.name!r}: the train split lacks classes {sorted(set(range(ds.num_classes)) - set(present.tolist()))}")
    # One fixed test subset for every method and seed: differences are the methods', not the data's.
    content = hash_arrays(ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    return _Target(spec, ds, per_class_subset(ds.y_test, cfg.max_test_per_class, 12345), content)


def _test_tensors(target: _Target, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    key = (shape[0], shape[1])
    if key not in target.prepared:
        x = prepare_images(target.data.x_test[target.test_idx], shape[1], shape[0])
        target.prepared[key] = (x, torch.from_numpy(target.data.y_test[target.test_idx]))
    return target.prepared[key]


def train_tensors(target: _Target, shape: tuple[int, int, int], seed: int, per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's training subset of a target, prepared: the data in hand of every cell of that seed."""
    idx = per_class_subset(target.data.y_train, per_class, seed)
    return prepare_images(target.data.x_train[idx], shape[1], shape[0]), torch.from_numpy(target.data.y_train[idx])


def source_tasks(cfg: BenchmarkConfig, shape: tuple[int, int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded class-balanced tasks from the ablation's *source* datasets (never a target)."""
    from pipeline.apps.prune import resolve_data

    ab = cfg.ablation
    overlap = sorted(set(ab.sources) & {t.data for t in cfg.targets})
    if overlap:
        raise BenchmarkError(f"ablation.sources: {overlap} are also targets; the mean embedding must come from sources only")
    datasets = [resolve_data(s) for s in ab.sources]
    rng = np.random.default_rng(ab.seed)
    tasks = []
    for _ in range(ab.tasks):
        ds = datasets[int(rng.integers(len(datasets)))]
        x_all, y_all = (ds.x_test, ds.y_test) if ab.split == "test" and len(ds.x_test) else (ds.x_train, ds.y_train)
        classes = rng.choice(np.unique(y_all), size=min(ab.ways, len(np.unique(y_all))), replace=False)
        idx, labels = [], []
        for k, c in enumerate(classes):
            pick = rng.permutation(np.flatnonzero(y_all == c))[: ab.per_class]
            idx.append(pick)
            labels.append(np.full(len(pick), k))
        sel = np.concatenate(idx)
        tasks.append((prepare_images(x_all[sel], shape[1], shape[0]), torch.from_numpy(np.concatenate(labels))))
    return tasks


def _latency(model: torch.nn.Module, shape: tuple[int, int, int], cfg: BenchmarkConfig) -> tuple[float, float]:
    with torch_threads(cfg.latency.threads):
        b1 = 1000 * measure_latency(model, shape, 1, repeats=cfg.latency.repeats_b1, warmup=2)
        b64 = 1000 * measure_latency(model, shape, 64, repeats=cfg.latency.repeats_b64, warmup=1)
    return b1, b64


def _run_cell(cell: CellKey, cfg: BenchmarkConfig, m: _Model, target: _Target,
              others: Callable[[], dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> tuple[dict[str, Any], dict[str, list[int]] | None]:
    shape = m.input_shape
    x_test, y_test = _test_tensors(target, shape)
    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cell.seed)
        # Data in hand = the decoded training subset: from here the clock runs.
        x, y = train_tensors(target, shape, cell.seed, cfg.max_train_per_class)
        ctx = MaskContext(cfg, m.pruner, m.weights[cell.weights], x, y, m.mean_embedding,
                          others() if cell.method.startswith(CROSS_PREFIX) else {})
        t0 = time.perf_counter()
        mask = obtain_mask(cell, ctx)
        mask_seconds = time.perf_counter() - t0
        ft = cfg.finetune
        finetune = TrainConfig(epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr, weight_decay=ft.weight_decay,
                               augment=ft.augment, seed=cell.seed)
        weights = mask.weights.to(device)
        result = prune_and_finetune(weights, mask.spec, x.to(device), y.to(device), x_test.to(device), y_test.to(device),
                                    finetune, recalibrate_bn=cfg.recalibrate_bn, curve_epochs=ft.curve)
        mask.weights.cpu()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    model = result.model.cpu()
    macs, params = count_macs_params(model, shape)
    # The reference is the full architecture with the same head: only pruning differs.
    full = build_backbone_from_config({**m.weights["meta"].config, "num_classes": model.classifier.out_features})
    macs_full, params_full = count_macs_params(full, shape)
    b1, b64 = _latency(model, shape, cfg)
    row = {
        "status": "ok", "error": None, "accuracy": result.accuracy, "accuracy_before_finetune": result.accuracy_before_finetune,
        "finetune_epochs": ft.epochs, "curve": result.curve,
        "macs": macs, "params": params, "macs_full": macs_full, "params_full": params_full,
        "macs_ratio": macs / macs_full, "latency_b1_ms": b1, "latency_b64_ms": b64,
        "latency_threads": cfg.latency.threads, "mask_seconds": mask_seconds,
        "method_train_seconds": mask.train_seconds, "build_seconds": result.prune_seconds,
        "finetune_seconds": result.finetune_seconds,
        "total_seconds": mask_seconds + result.prune_seconds + result.finetune_seconds,
        "n_train": len(x), "n_test": len(x_test), "num_classes": task_classes(y),
    }
    return row, (mask.spec.kept if mask.spec is not None else None)


def run_benchmark(
    cfg: BenchmarkConfig,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool | Callable[[str], None] = True,
    report_only: bool = False,
) -> BenchmarkResult:
    """Run (or resume) the grid of ``cfg`` into ``out_dir`` and write the tables and plots.

    With ``report_only`` no cell runs: the tables, plots and MLflow run summarise what
    ``results.csv`` already holds (e.g. while another process is still filling it).

    Raises:
        BenchmarkError: results.csv in out_dir is not a benchmark file; the output is not writable.
        RegistryError: MLflow is enabled but its server cannot be reached (checked before any cell).
    """
    started = time.perf_counter()
    say = progress if callable(progress) else (_print if progress else (lambda _m: None))
    out = Path(out_dir).expanduser().resolve() if out_dir else resolved_out_dir(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchmarkError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None
    csv_path = out / RESULTS_CSV
    tracking_uri = _checked_tracking_uri(cfg)  # fail in seconds, not after the grid

    inputs = _Inputs(cfg)
    cells = plan_cells(cfg)
    latest: dict[str, dict[str, Any]] = {row_id(row): row for row in read_results(csv_path)}
    todo, skipped, prints = _to_run(cfg, cells, latest, inputs)
    if report_only:
        todo = []
    if todo and cfg.reuse_results:
        todo, reused, missing = _reuse(cfg, todo, prints, csv_path, latest)
        skipped += reused
        if missing:
            say(f"benchmark {cfg.name}: reuse_results {', '.join(missing)} not found (not run yet): nothing copied from it")
        if reused:
            say(f"benchmark {cfg.name}: {len(reused)} cells copied from {', '.join(cfg.reuse_results)}")
    shard = f" (shard {cfg.shard})" if cfg.shard_index()[1] > 1 else ""
    say(f"benchmark {cfg.name}: {len(cells)} cells, {len(skipped)} already done, {len(todo)} to run{shard} -> {out}")

    computed, failed = [], []
    with torch_threads(cfg.threads or None):
        for i, cell in enumerate(todo, 1):
            t_cell = time.perf_counter()
            row, kept, msg = _run_recorded_cell(cell, cfg, inputs, prints[cell.id])
            if row["status"] == "failed":
                failed.append(cell.id)
            append_row(csv_path, row)
            if kept is not None:
                append_mask(out / MASKS_JSONL, cell, prints[cell.id], kept)
            latest[cell.id] = parse_row({k: str(csv_value(k, row.get(k))) for k in COLUMNS})
            computed.append(cell.id)
            say(f"[{i}/{len(todo)}] {cell.id}: {msg} ({time.perf_counter() - t_cell:.1f}s)")

    # Only rows recorded with the current inputs and settings: a re-fitted pruner's report must not mix in the
    # previous pruner's cells that have not been recomputed yet (e.g. with --report-only during a run).
    rows = [latest[c.id] for c in cells if c.id in latest and latest[c.id].get("fingerprint") == prints[c.id]]
    stale = sum(1 for c in cells if c.id in latest) - len(rows)
    if stale:
        say(f"benchmark {cfg.name}: {stale} recorded cells left out of the report: recorded with other inputs or "
            f"settings (a re-fitted pruner, changed data); run without --report-only to recompute them")
    md_path, plots = write_report(out, rows, cfg)
    result = BenchmarkResult(out, csv_path, md_path, plots, computed, skipped, failed, rows,
                             seconds=time.perf_counter() - started)
    if tracking_uri is not None:
        result.mlflow_run_id = log_to_mlflow(cfg, tracking_uri, result)
        say(f"logged to MLflow run {result.mlflow_run_id}")
    return result


def _checked_tracking_uri(cfg: BenchmarkConfig) -> str | None:
    """The MLflow URI the final report logs to, after one reachability probe; None when nothing logs."""
    if not cfg.mlflow.enabled or cfg.shard_index()[1] != 1:  # shards never log: the final plain run does
        return None
    from pipeline.config import resolved_tracking_uri
    from pipeline.registry import check_tracking_uri

    tracking_uri = resolved_tracking_uri(cfg.mlflow)
    check_tracking_uri(tracking_uri)
    return tracking_uri


class _Inputs:
    """The grid's models and targets, each loaded once on first use (a load error fails only its cells)."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self.targets = {t.name: t for t in cfg.targets}
        self.models = {m.backbone: m for m in cfg.models}
        self.loaded_models: dict[str, _Model | Exception] = {}
        self.loaded_targets: dict[str, _Target | Exception] = {}
        self.train_cache: dict[tuple[str, int], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def model_of(self, name: str, weights: str = "meta") -> _Model:
        m = _cached(self.loaded_models, name, lambda: _load_model(self.models[name]))
        if weights == "pretrained":
            _cached(self.loaded_models, f"{name}|pretrained", lambda: _load_pretrained(m))
        return m

    def target_of(self, name: str) -> _Target:
        return _cached(self.loaded_targets, name, lambda: _load_target(self.targets[name], self.cfg))

    def print_of(self, c: CellKey) -> str:
        """The cell's fingerprint (config + input contents); "unavailable" when an input fails to load."""
        try:
            m, t = self.model_of(c.backbone, c.weights), self.target_of(c.target)
            contents = {"target": t.hash}
            if c.weights == "pretrained":
                contents["pretrained"] = m.hashes["pretrained"]
            if c.weights == "meta" or c.method.startswith("stamp"):
                contents["pruner"] = m.hashes["pruner"]
            else:  # a baseline on the pretrained weights does not depend on the pruner: another pruner reuses it
                arch = {k: v for k, v in m.pruner.backbone.config.items() if k != "num_classes"}
                contents["architecture"] = json.dumps([arch, list(m.input_shape)], sort_keys=True)
            if c.method.startswith(CROSS_PREFIX):
                contents["source"] = self.target_of(c.mask_source).hash
        except Exception:  # noqa: BLE001 - recorded per cell when it runs
            return "unavailable"
        return fingerprint(self.cfg, c, contents)

    def train_sets(self, c: CellKey, m: _Model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Training tensors of ``c.mask_source`` (a ``stamp@U`` cell's other target) for this backbone and seed."""
        key = (c.backbone, c.seed)
        if key not in self.train_cache:
            self.train_cache.clear()  # one seed at a time: the grid runs seed by seed
            self.train_cache[key] = {}
        if c.mask_source not in self.train_cache[key]:
            self.train_cache[key][c.mask_source] = train_tensors(self.target_of(c.mask_source), m.input_shape, c.seed,
                                                                 self.cfg.max_train_per_class)
        return self.train_cache[key]


def _reuse(cfg: BenchmarkConfig, todo: list[CellKey], prints: dict[str, str], csv_path: Path,
           latest: dict[str, dict[str, Any]]) -> tuple[list[CellKey], list[str], list[str]]:
    """Copy the cells of ``todo`` that another run recorded with the same fingerprint.

    Returns (still to run, copied, reuse paths that do not exist). A missing file is not an error: two runs that
    share baselines name each other, and whichever runs first computes them.

    Raises:
        BenchmarkError: a reuse path exists but is not a file (e.g. a run directory instead of its results.csv).
    """
    found: dict[str, dict[str, Any]] = {}
    missing = [path for path in cfg.reuse_results if not Path(path).exists()]
    for path in cfg.reuse_results:
        if path in missing:
            continue
        if not Path(path).is_file():
            raise BenchmarkError(f"reuse_results: {path} is not a file (expected another benchmark run's results.csv)")
        for row in read_results(path):
            if row["status"] == "ok" and row.get("fingerprint") not in (None, "unavailable"):
                found[row_id(row)] = row
    remaining, copied = [], []
    for cell in todo:
        row = found.get(cell.id)
        if row is not None and row["fingerprint"] == prints[cell.id]:
            append_row(csv_path, row)
            latest[cell.id] = row
            copied.append(cell.id)
        else:
            remaining.append(cell)
    return remaining, copied, missing


def _to_run(cfg: BenchmarkConfig, cells: list[CellKey], latest: dict[str, dict[str, Any]],
            inputs: _Inputs) -> tuple[list[CellKey], list[str], dict[str, str]]:
    """(cells to run in this shard, ids already recorded with the same fingerprint, fingerprints)."""
    done_status = ("ok",) if cfg.retry_failed else ("ok", "failed")
    todo, skipped, prints = [], [], {}
    for c in cells:
        row = latest.get(c.id)
        prints[c.id] = inputs.print_of(c)
        if row is not None and row["status"] in done_status and row.get("fingerprint") == prints[c.id] != "unavailable":
            skipped.append(c.id)
        else:
            todo.append(c)
    k, n = cfg.shard_index()
    if n > 1:
        mine = {c.id for j, c in enumerate(cells) if j % n == k}
        todo = [c for c in todo if c.id in mine]
    return todo, skipped, prints


def _run_recorded_cell(cell: CellKey, cfg: BenchmarkConfig, inputs: _Inputs,
                       print_: str) -> tuple[dict[str, Any], Any, str]:
    """(results.csv row, kept channels or None, progress message) of one cell; a failure is a row too."""
    base_row = {"target": cell.target, "backbone": cell.backbone, "weights": cell.weights, "method": cell.method,
                "macs_ratio_target": cell.budget, "seed": cell.seed, "fingerprint": print_}
    kept = None
    try:
        m, t = inputs.model_of(cell.backbone, cell.weights), inputs.target_of(cell.target)
        if cell.method == "stamp_mean" and m.mean_embedding is None:
            m.mean_embedding = m.pruner.mean_embedding(source_tasks(cfg, m.input_shape))
        result, kept = _run_cell(cell, cfg, m, t, lambda: inputs.train_sets(cell, m))
        row = {**base_row, **result}
        msg = (f"acc {100 * row['accuracy']:.1f}% MACs {row['macs_ratio']:.3f} "
               f"mask {row['mask_seconds']:.1f}s ft {row['finetune_seconds']:.1f}s")
    except Exception as exc:  # noqa: BLE001 - a failed cell is recorded, the grid goes on
        error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        row = {**base_row, "status": "failed", "error": error}
        msg = f"FAILED {error}"
    row["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return row, kept, msg


def _cached(cache: dict[str, Any], key: str, load: Callable[[], Any]) -> Any:
    """Load once; a load error is remembered and fails every cell that needs it, not the run."""
    if key not in cache:
        try:
            cache[key] = load()
        except Exception as exc:  # noqa: BLE001 - re-raised per cell below
            cache[key] = exc
    value = cache[key]
    if isinstance(value, Exception):
        raise value
    return value


def _print(message: str) -> None:
    print(f"[stamp benchmark] {message}", flush=True)
