"""STAMP against pruning baselines on unseen targets at matched MACs (``stamp benchmark``).

The grid is target x backbone x method x budget x seed. Every cell, from data in hand:

1. obtain a mask (timed): STAMP's one pass, a baseline's scores + the same global calibration
   (:func:`stamp_core.baselines.select_spec`), or Beta-Bernoulli dropout's own training;
2. build the physically pruned network, recompute its BatchNorm statistics on the target's
   training images and give it a prototype head for the target's classes;
3. fine-tune it with the same budget for every method (timed);
4. measure top-1 on the target's test split, MACs, parameters and CPU latency at batch 1 and 64
   with a fixed thread count.

Each finished cell is appended to ``results.csv`` at once (fsync'd), so an interrupted run resumes
where it stopped: cells already recorded with the same settings are skipped; a failed cell is
recorded with its error and the grid goes on. At the end ``results.md`` (mean +- std over seeds),
``accuracy_vs_macs.png`` and ``time_vs_accuracy.png`` are written and, when MLflow is enabled,
logged to one run with the CSV.

Baselines prune the *pretrained* backbone (``models[].pretrained``); STAMP prunes its own
meta-trained copy. Hyper-parameters come from the config, chosen on meta-validation (source)
tasks; the targets' test splits are only ever scored.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import BenchmarkConfig, BenchmarkModel, BenchmarkTarget, ConfigError
from pipeline.data import ArrayDataset
from stamp_core import (
    Backbone,
    StampPruner,
    TrainConfig,
    count_macs_params,
    evaluate_accuracy,
    init_classifier_from_prototypes,
    measure_latency,
    prepare_images,
    train_classifier,
)
from stamp_core.baselines import (
    NORMALIZED_METHODS,
    BBDConfig,
    recalibrate_batchnorm,
    score_grasp,
    score_l1,
    score_random,
    score_snip,
    score_synflow,
    score_uniform,
    select_spec,
    train_beta_bernoulli_dropout,
)

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
ACCURACY_PNG = "accuracy_vs_macs.png"
TIME_PNG = "time_vs_accuracy.png"

COLUMNS = [
    "target", "backbone", "method", "macs_ratio_target", "seed", "status", "error",
    "accuracy", "accuracy_before_finetune", "macs", "params", "macs_full", "params_full", "macs_ratio",
    "latency_b1_ms", "latency_b64_ms", "latency_threads", "mask_seconds", "method_train_seconds",
    "finetune_seconds", "total_seconds", "n_train", "n_test", "num_classes", "weights",
    "fingerprint", "finished_at",
]
_FLOATS = {"accuracy", "accuracy_before_finetune", "macs_ratio", "latency_b1_ms", "latency_b64_ms",
           "mask_seconds", "method_train_seconds", "finetune_seconds", "total_seconds", "macs_ratio_target"}
_INTS = {"macs", "params", "macs_full", "params_full", "latency_threads", "n_train", "n_test", "num_classes", "seed"}
_METHOD_LABELS = {
    "full": "full network", "uniform": "uniform width", "random": "random channels", "l1": "L1 magnitude",
    "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "bbd": "Beta-Bernoulli dropout",
    "stamp": "STAMP", "stamp_mean": "STAMP (mean embedding)",
}


class BenchmarkError(RuntimeError):
    """The benchmark cannot run (bad inputs named in the message); single cells never raise it."""


@dataclass(frozen=True)
class CellKey:
    """One cell of the grid; ``budget`` is 1.0 for the full network."""

    target: str
    backbone: str
    method: str
    budget: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.target}|{self.backbone}|{self.method}|{self.budget:g}|{self.seed}"


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


# ----------------------------------------------------------------------------- planning


def plan_cells(cfg: BenchmarkConfig) -> list[CellKey]:
    """Every cell of the grid, in run order (target, backbone, seed, method, budget)."""
    cells = []
    for target in cfg.targets:
        for model in cfg.models:
            for seed in cfg.seeds:
                for method in cfg.methods:
                    budgets = [1.0] if method == "full" else cfg.budgets
                    cells.extend(CellKey(target.name, model.backbone, method, float(r), seed) for r in budgets)
    return cells


def _fingerprint(cfg: BenchmarkConfig, target: BenchmarkTarget, model: BenchmarkModel, method: str) -> str:
    """Hash of the settings a cell's numbers depend on: a changed setting recomputes the cell."""
    parts: dict[str, Any] = {
        "target": target.data, "model": model.model_dump(mode="json"),
        "max_train_per_class": cfg.max_train_per_class, "max_test_per_class": cfg.max_test_per_class,
        "round_to": cfg.round_to, "finetune": cfg.finetune.model_dump(mode="json"), "recalibrate_bn": cfg.recalibrate_bn,
        "latency": cfg.latency.model_dump(mode="json"), "threads": cfg.threads,
    }
    if cfg.device != "cpu":  # absent for CPU runs, so results recorded before the option existed resume
        parts["device"] = cfg.device
    if method in ("snip", "grasp"):
        parts["score_batch"] = cfg.score_batch
    if method in ("stamp", "stamp_mean"):
        parts["sample_per_class"] = cfg.sample_per_class
    if method == "stamp_mean":
        parts["ablation"] = cfg.ablation.model_dump(mode="json")
    if method == "bbd":
        parts["bbd"] = cfg.bbd.model_dump(mode="json")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def resolved_out_dir(cfg: BenchmarkConfig) -> Path:
    """``cfg.out_dir``, else ``STATE_DIR/benchmark/<name>``."""
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    from pipeline.settings import get_settings

    return get_settings().state_dir / "benchmark" / cfg.name


# ----------------------------------------------------------------------------- results.csv


def _parse_row(raw: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k in COLUMNS:
        v = raw.get(k, "")
        if v == "" or v is None:
            row[k] = None
        elif k in _FLOATS:
            row[k] = float(v)
        elif k in _INTS:
            row[k] = int(float(v))
        else:
            row[k] = v
    return row


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a results.csv (typed; empty cells are None), in file order."""
    p = Path(path)
    if not p.is_file():
        return []
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("target", "backbone", "method", "macs_ratio_target", "seed", "status") if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(
                f"{p} is not a benchmark results file (no column(s) {', '.join(missing)}): move it away or choose another out_dir"
            )
        rows = []
        for raw in reader:
            try:
                row = _parse_row(raw)
                _row_id(row)
            except (TypeError, ValueError):
                continue  # a line cut short by a crash mid-write: that cell simply runs again
            if row["status"] in ("ok", "failed"):
                rows.append(row)
        return rows


def _row_id(row: dict[str, Any]) -> str:
    return CellKey(row["target"], row["backbone"], row["method"], float(row["macs_ratio_target"]), int(row["seed"])).id


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"  # a crash cut the last line: start a fresh one
    with path.open("a", newline="") as fh:
        if not new and torn:
            fh.write("\n")
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- inputs


@dataclass
class _Model:
    spec: BenchmarkModel
    pruner: StampPruner
    base: Backbone  #: the weights the baselines prune
    weights: str  #: "pretrained" or "pruner"
    input_shape: tuple[int, int, int]
    mean_embedding: torch.Tensor | None = None


@dataclass
class _Target:
    spec: BenchmarkTarget
    data: ArrayDataset
    test_idx: np.ndarray
    prepared: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


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
    if spec.pretrained:
        from pipeline.data import load_pretrained_backbone

        base = load_pretrained_backbone(spec.pretrained)
        mine = {k: v for k, v in base.config.items() if k != "num_classes"}
        theirs = {k: v for k, v in pruner.backbone.config.items() if k != "num_classes"}
        if mine != theirs:
            raise BenchmarkError(f"models: pretrained {spec.pretrained} is a {mine} backbone but the pruner's is {theirs}")
        weights = "pretrained"
    else:
        base = copy.deepcopy(pruner.backbone)
        weights = "pruner"
    return _Model(spec, pruner, base.eval(), weights, pruner.input_shape)


def _per_class_subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _load_target(spec: BenchmarkTarget, cfg: BenchmarkConfig) -> _Target:
    from pipeline.apps.prune import resolve_data

    ds = resolve_data(spec.data)
    if len(ds.x_test) == 0:
        raise BenchmarkError(f"target {spec.name!r} ({spec.data}) has no test split: a benchmark scores on held-out images")
    present = np.unique(ds.y_train)
    if len(present) != ds.num_classes:
        raise BenchmarkError(f"target {spec.name!r}: the train split lacks classes {sorted(set(range(ds.num_classes)) - set(present.tolist()))}")
    # One fixed test subset for every method and seed: differences are the methods', not the data's.
    return _Target(spec, ds, _per_class_subset(ds.y_test, cfg.max_test_per_class, 12345))


def _test_tensors(target: _Target, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    key = (shape[0], shape[1])
    if key not in target.prepared:
        x = prepare_images(target.data.x_test[target.test_idx], shape[1], shape[0])
        target.prepared[key] = (x, torch.from_numpy(target.data.y_test[target.test_idx]))
    return target.prepared[key]


def _train_tensors(target: _Target, shape: tuple[int, int, int], seed: int, per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    idx = _per_class_subset(target.data.y_train, per_class, seed)
    return prepare_images(target.data.x_train[idx], shape[1], shape[0]), torch.from_numpy(target.data.y_train[idx])


def source_tasks(cfg: BenchmarkConfig, shape: tuple[int, int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded class-balanced tasks from the ablation's *source* datasets (never a target)."""
    from pipeline.apps.prune import resolve_data

    ab = cfg.ablation
    target_specs = {t.data for t in cfg.targets}
    overlap = sorted(set(ab.sources) & target_specs)
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


# ----------------------------------------------------------------------------- one cell


def _class_balanced(labels: torch.Tensor, total: int, seed: int) -> torch.Tensor:
    y = labels.numpy()
    classes = np.unique(y)
    per_class = max(1, total // len(classes))
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes])))


def _obtain_model(cell: CellKey, cfg: BenchmarkConfig, m: _Model, x: torch.Tensor, y: torch.Tensor) -> tuple[Backbone, float]:
    """The pruned network with a prototype head; returns it and the method's own training seconds."""
    from pipeline.apps.prune import class_balanced_sample

    k = int(y.max()) + 1
    method, r = cell.method, cell.budget
    train_seconds = 0.0
    if method in ("stamp", "stamp_mean"):
        pruner = m.pruner
        if method == "stamp":
            idx = torch.from_numpy(class_balanced_sample(y.numpy(), cfg.sample_per_class, cell.seed, pruner.config.max_support))
            with torch.no_grad():
                embedding = pruner.embed(pruner.extract_features(x[idx]), y[idx])
        else:
            if m.mean_embedding is None:
                raise BenchmarkError("the mean embedding was not computed (ablation.sources failed to load)")
            embedding = m.mean_embedding
        spec = pruner.generate(x, y, macs_ratio=r, round_to=cfg.round_to, embedding=embedding)
        model = pruner.build_pruned(spec, num_classes=k)
    else:
        model = copy.deepcopy(m.base)
        model.reset_classifier(k)
        if method != "full":
            init_classifier_from_prototypes(model, x, y)  # SNIP/GraSP/BBD need a head for the target's classes
            structure = m.pruner.structure
            if method == "uniform":
                scores = score_uniform(structure)
            elif method == "random":
                scores = score_random(structure, cell.seed)
            elif method == "l1":
                scores = score_l1(model, structure)
            elif method == "synflow":
                scores = score_synflow(model, structure)
            elif method in ("snip", "grasp"):
                b = _class_balanced(y, cfg.score_batch, cell.seed)
                scores = (score_snip if method == "snip" else score_grasp)(model, structure, x[b], y[b])
            elif method == "bbd":
                bbd = cfg.bbd
                result = train_beta_bernoulli_dropout(
                    model, structure, x, y, r,
                    BBDConfig(epochs=bbd.epochs, batch_size=bbd.batch_size, lr=bbd.lr, gate_lr=bbd.gate_lr,
                              kl_weight=bbd.kl_weight, macs_weight=bbd.macs_weight, seed=cell.seed),
                )
                scores, train_seconds = result.scores, result.seconds
            else:  # pragma: no cover - the config validates method names
                raise BenchmarkError(f"unknown method {method!r}")
            spec = select_spec(scores, structure, model.config, r, cfg.round_to,
                               normalize=method in NORMALIZED_METHODS, metadata={"method": method})
            spec.apply(model)
    if cfg.recalibrate_bn:
        recalibrate_batchnorm(model, x)
    init_classifier_from_prototypes(model, x, y)  # the same head start for every method
    return model, train_seconds


def _latency(model: torch.nn.Module, shape: tuple[int, int, int], cfg: BenchmarkConfig) -> tuple[float, float]:
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.latency.threads)
    try:
        b1 = 1000 * measure_latency(model, shape, 1, repeats=cfg.latency.repeats_b1, warmup=2)
        b64 = 1000 * measure_latency(model, shape, 64, repeats=cfg.latency.repeats_b64, warmup=1)
        return b1, b64
    finally:
        torch.set_num_threads(previous)


def _run_cell(cell: CellKey, cfg: BenchmarkConfig, m: _Model, target: _Target) -> dict[str, Any]:
    shape = m.input_shape
    x_test, y_test = _test_tensors(target, shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cell.seed)
        # Data in hand = the decoded training subset: from here the clock runs.
        x, y = _train_tensors(target, shape, cell.seed, cfg.max_train_per_class)
        t0 = time.perf_counter()
        model, train_seconds = _obtain_model(cell, cfg, m, x, y)
        mask_seconds = time.perf_counter() - t0
        device = torch.device(cfg.device)
        model, xd, yd, xt, yt = model.to(device), x.to(device), y.to(device), x_test.to(device), y_test.to(device)
        acc0 = evaluate_accuracy(model, xt, yt)
        ft = cfg.finetune
        t1 = time.perf_counter()
        if ft.epochs > 0:
            train_classifier(model, xd, yd, TrainConfig(epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr,
                                                        weight_decay=ft.weight_decay, augment=ft.augment, seed=cell.seed))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finetune_seconds = time.perf_counter() - t1
    acc = evaluate_accuracy(model, xt, yt)
    model = model.cpu()
    macs, params = count_macs_params(model, shape)
    full = copy.deepcopy(m.base)
    full.reset_classifier(int(y.max()) + 1)
    macs_full, params_full = count_macs_params(full, shape)
    b1, b64 = _latency(model, shape, cfg)
    return {
        "status": "ok", "error": None, "accuracy": acc, "accuracy_before_finetune": acc0,
        "macs": macs, "params": params, "macs_full": macs_full, "params_full": params_full,
        "macs_ratio": macs / macs_full, "latency_b1_ms": b1, "latency_b64_ms": b64,
        "latency_threads": cfg.latency.threads, "mask_seconds": mask_seconds,
        "method_train_seconds": train_seconds, "finetune_seconds": finetune_seconds,
        "total_seconds": mask_seconds + finetune_seconds, "n_train": len(x), "n_test": len(x_test),
        "num_classes": int(y.max()) + 1, "weights": "pruner" if cell.method.startswith("stamp") else m.weights,
    }


# ----------------------------------------------------------------------------- the grid


def run_benchmark(
    cfg: BenchmarkConfig,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool | Callable[[str], None] = True,
    report_only: bool = False,
) -> BenchmarkResult:
    """Run (or resume) the grid of ``cfg`` into ``out_dir`` and write the table and plots.

    With ``report_only`` no cell runs: the table, plots and MLflow run summarise what
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
    tracking_uri = None
    if cfg.mlflow.enabled:
        from pipeline.config import resolved_tracking_uri
        from pipeline.registry import check_tracking_uri

        tracking_uri = resolved_tracking_uri(cfg.mlflow)
        check_tracking_uri(tracking_uri)  # fail in seconds, not after the grid

    cells = plan_cells(cfg)
    targets = {t.name: t for t in cfg.targets}
    models = {m.backbone: m for m in cfg.models}
    prints = {c.id: _fingerprint(cfg, targets[c.target], models[c.backbone], c.method) for c in cells}
    latest: dict[str, dict[str, Any]] = {}
    for row in read_results(csv_path):
        latest[_row_id(row)] = row
    done_status = ("ok",) if cfg.retry_failed else ("ok", "failed")
    todo, skipped = [], []
    for c in cells:
        row = latest.get(c.id)
        if row is not None and row["status"] in done_status and row.get("fingerprint") == prints[c.id]:
            skipped.append(c.id)
        else:
            todo.append(c)
    if report_only:
        todo = []
    say(f"benchmark {cfg.name}: {len(cells)} cells, {len(skipped)} already done, {len(todo)} to run -> {out}")

    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded_models: dict[str, _Model | Exception] = {}
    loaded_targets: dict[str, _Target | Exception] = {}
    computed, failed = [], []
    try:
        for i, cell in enumerate(todo, 1):
            t_cell = time.perf_counter()
            base_row = {"target": cell.target, "backbone": cell.backbone, "method": cell.method,
                        "macs_ratio_target": cell.budget, "seed": cell.seed, "fingerprint": prints[cell.id]}
            try:
                m = _cached(loaded_models, cell.backbone, lambda: _load_model(models[cell.backbone]))
                t = _cached(loaded_targets, cell.target, lambda: _load_target(targets[cell.target], cfg))
                if cell.method == "stamp_mean" and m.mean_embedding is None:
                    m.mean_embedding = m.pruner.mean_embedding(source_tasks(cfg, m.input_shape))
                row = {**base_row, **_run_cell(cell, cfg, m, t)}
                msg = (f"acc {100 * row['accuracy']:.1f}% MACs {row['macs_ratio']:.3f} "
                       f"mask {row['mask_seconds']:.1f}s ft {row['finetune_seconds']:.1f}s")
            except Exception as exc:  # noqa: BLE001 - a failed cell is recorded, the grid goes on
                error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
                row = {**base_row, "status": "failed", "error": error}
                failed.append(cell.id)
                msg = f"FAILED {error}"
            row["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            _append_row(csv_path, row)
            latest[cell.id] = _parse_row({k: "" if row.get(k) is None else str(row[k]) for k in COLUMNS})
            computed.append(cell.id)
            say(f"[{i}/{len(todo)}] {cell.id}: {msg} ({time.perf_counter() - t_cell:.1f}s)")
    finally:
        torch.set_num_threads(previous_threads)

    rows = [latest[c.id] for c in cells if c.id in latest]
    md_path = out / RESULTS_MD
    _atomic_text(md_path, results_markdown(rows, cfg))
    plots = [_save_figure(plot_benchmark_accuracy_vs_macs(rows), out / ACCURACY_PNG),
             _save_figure(plot_time_vs_accuracy(rows), out / TIME_PNG)]
    result = BenchmarkResult(out, csv_path, md_path, plots, computed, skipped, failed, rows,
                             seconds=time.perf_counter() - started)
    if tracking_uri is not None:
        result.mlflow_run_id = _log_to_mlflow(cfg, tracking_uri, result)
        say(f"logged to MLflow run {result.mlflow_run_id}")
    return result


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


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- summaries


def _budget_label(method: str, budget: float) -> str:
    return "1 (full)" if method == "full" else f"{budget:g}"


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of each (target, backbone, method, budget); ok rows only."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = defaultdict(list)
    counts: dict[tuple[str, str, str, float], int] = defaultdict(int)
    order: list[tuple[str, str, str, float]] = []
    for row in rows:
        key = (row["target"], row["backbone"], row["method"], float(row["macs_ratio_target"]))
        if key not in counts:
            order.append(key)
        counts[key] += 1
        if row["status"] == "ok":
            groups[key].append(row)
    out = []
    for key in order:
        ok = groups.get(key, [])
        agg: dict[str, Any] = {"target": key[0], "backbone": key[1], "method": key[2], "budget": key[3],
                               "n_ok": len(ok), "n": counts[key]}
        for metric in ("accuracy", "macs_ratio", "params", "latency_b1_ms", "latency_b64_ms", "mask_seconds",
                       "method_train_seconds", "finetune_seconds", "total_seconds"):
            vals = [float(r[metric]) for r in ok if r.get(metric) is not None]
            agg[metric] = statistics.fmean(vals) if vals else math.nan
            agg[f"{metric}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else math.nan
        out.append(agg)
    return out


def results_markdown(rows: list[dict[str, Any]], cfg: BenchmarkConfig | None = None) -> str:
    """The Markdown report: one table of every (target, backbone, budget, method), then STAMP vs best baseline."""
    agg = aggregate(rows)
    method_order = {m: i for i, m in enumerate(_METHOD_LABELS)}
    agg.sort(key=lambda a: (a["target"], a["backbone"], -a["budget"], method_order.get(a["method"], 99)))
    lines = ["# STAMP vs pruning baselines at matched MACs", ""]
    if cfg is not None:
        lines += [
            f"Seeds {cfg.seeds}; fine-tune {cfg.finetune.epochs} epoch(s) (lr {cfg.finetune.lr:g}) for every method; "
            f"up to {cfg.max_train_per_class} train / {cfg.max_test_per_class} test images per class; "
            f"latency: median ms per forward pass with {cfg.latency.threads} thread(s). "
            "Times in seconds from data in hand; *mask* includes a method's own training "
            "(Beta-Bernoulli dropout), *total* = mask + fine-tune.",
            "",
        ]
    lines += [
        "| target | backbone | MACs budget | method | top-1 % (mean ± std) | MACs ratio | params (M) | "
        "latency b1 ms | latency b64 ms | mask s | fine-tune s | total s | seeds ok |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pm(a: dict[str, Any], k: str, scale: float = 1.0, digits: int = 1) -> str:
        v = a[k]
        return "failed" if math.isnan(v) else f"{scale * v:.{digits}f} ± {scale * a[k + '_std']:.{digits}f}"

    def num(v: float, fmt: str) -> str:
        return "–" if math.isnan(v) else format(v, fmt)

    for a in agg:
        lines.append(
            f"| {a['target']} | {a['backbone']} | {_budget_label(a['method'], a['budget'])} | "
            f"{_METHOD_LABELS.get(a['method'], a['method'])} | {pm(a, 'accuracy', 100)} | {num(a['macs_ratio'], '.3f')} | "
            f"{num(a['params'] / 1e6, '.3f')} | {num(a['latency_b1_ms'], '.2f')} | {num(a['latency_b64_ms'], '.1f')} | "
            f"{num(a['mask_seconds'], '.2f')} | {num(a['finetune_seconds'], '.1f')} | {num(a['total_seconds'], '.1f')} | "
            f"{a['n_ok']}/{a['n']} |"
        )
    summary = _stamp_vs_best(agg)
    if summary:
        lines += ["", "## STAMP vs the best baseline at each budget", "",
                  "| target | backbone | MACs budget | STAMP top-1 % | best baseline | its top-1 % | STAMP − best (points) | STAMP − mean-embedding ablation |",
                  "|---|---|---:|---:|---|---:|---:|---:|"]
        lines += summary
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", f"## Failed cells ({len(failures)})", ""]
        lines += [f"- `{_row_id(r)}`: {r.get('error') or 'unknown error'}" for r in failures[:50]]
    return "\n".join(lines) + "\n"


def _stamp_vs_best(agg: list[dict[str, Any]]) -> list[str]:
    by_cell: dict[tuple[str, str, float], dict[str, dict[str, Any]]] = defaultdict(dict)
    for a in agg:
        if a["method"] != "full":
            by_cell[(a["target"], a["backbone"], a["budget"])][a["method"]] = a
    lines = []
    for (target, backbone, budget), methods in by_cell.items():
        stamp = methods.get("stamp")
        baselines = {m: a for m, a in methods.items() if not m.startswith("stamp") and not math.isnan(a["accuracy"])}
        if stamp is None or math.isnan(stamp["accuracy"]) or not baselines:
            continue
        best_m, best = max(baselines.items(), key=lambda kv: kv[1]["accuracy"])
        mean = methods.get("stamp_mean")
        ablation = "–" if mean is None or math.isnan(mean["accuracy"]) else f"{100 * (stamp['accuracy'] - mean['accuracy']):+.1f}"
        lines.append(
            f"| {target} | {backbone} | {budget:g} | {100 * stamp['accuracy']:.1f} | {_METHOD_LABELS[best_m]} | "
            f"{100 * best['accuracy']:.1f} | {100 * (stamp['accuracy'] - best['accuracy']):+.1f} | {ablation} |"
        )
    return lines


def _panels(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted({(r["target"], r["backbone"]) for r in rows}) or [("no results", "")]


def plot_benchmark_accuracy_vs_macs(rows: list[dict[str, Any]]) -> Any:
    """One panel per (target, backbone): accuracy (mean ± std over seeds) against real MACs ratio."""
    from matplotlib.figure import Figure

    agg = aggregate(rows)
    panels = _panels(rows)
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (target, backbone) in zip(axes, panels):
        mine = [a for a in agg if a["target"] == target and a["backbone"] == backbone and not math.isnan(a["accuracy"])]
        for method in _METHOD_LABELS:
            pts = sorted((a for a in mine if a["method"] == method), key=lambda a: a["macs_ratio"])
            if not pts:
                continue
            xs, ys, es = ([a["macs_ratio"] for a in pts], [100 * a["accuracy"] for a in pts], [100 * a["accuracy_std"] for a in pts])
            if method == "full":
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label=_METHOD_LABELS[method])
                continue
            style = {"linewidth": 2.5} if method == "stamp" else {}
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=_METHOD_LABELS[method], **style)
        ax.set_xlabel("MACs ratio (pruned / full)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{target} / {backbone}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def plot_time_vs_accuracy(rows: list[dict[str, Any]]) -> Any:
    """One panel per (target, backbone): accuracy against seconds from data to deployable model (log x)."""
    from matplotlib.figure import Figure

    agg = aggregate(rows)
    panels = _panels(rows)
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    markers = "os^vD<>pXh*"
    for ax, (target, backbone) in zip(axes, panels):
        mine = [a for a in agg if a["target"] == target and a["backbone"] == backbone and not math.isnan(a["accuracy"])]
        for i, method in enumerate(_METHOD_LABELS):
            pts = [a for a in mine if a["method"] == method]
            if pts:
                ax.scatter([max(a["total_seconds"], 1e-3) for a in pts], [100 * a["accuracy"] for a in pts],
                           marker=markers[i % len(markers)], s=60 if method == "stamp" else 35, label=_METHOD_LABELS[method])
        ax.set_xscale("log")
        ax.set_xlabel("seconds from data in hand to deployable model")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{target} / {backbone} (all budgets)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def _save_figure(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _log_to_mlflow(cfg: BenchmarkConfig, tracking_uri: str, result: BenchmarkResult) -> str:
    import mlflow

    from pipeline.registry import ensure_experiment, use_tracking_uri

    experiment_id = ensure_experiment(cfg.mlflow.experiment, tracking_uri)
    with use_tracking_uri(tracking_uri):
        with mlflow.start_run(experiment_id=experiment_id, run_name=cfg.name) as run:
            mlflow.set_tags({"stamp.kind": "benchmark", "stamp.cells": str(len(result.rows))})
            mlflow.log_params({k: v[:500] for k, v in cfg.flat_params().items()})
            metrics = {}
            for a in aggregate(result.rows):
                if math.isnan(a["accuracy"]):
                    continue
                key = f"{a['target']}.{a['backbone']}.{a['method']}.r{a['budget']:g}"
                metrics[f"accuracy.{key}"] = a["accuracy"]
                metrics[f"total_seconds.{key}"] = a["total_seconds"]
                metrics[f"macs_ratio.{key}"] = a["macs_ratio"]
            metrics["cells_failed"] = float(sum(r["status"] == "failed" for r in result.rows))
            mlflow.log_metrics(metrics)
            for path in (result.csv_path, result.markdown_path, *result.plots):
                mlflow.log_artifact(str(path))
            return run.info.run_id


def load_benchmark_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark YAML (ConfigError names each bad key)."""
    from pipeline.config import load_config

    return load_config(path, overrides or [], model=BenchmarkConfig)


__all__ = [
    "BenchmarkError", "BenchmarkResult", "CellKey", "ConfigError", "aggregate", "load_benchmark_config",
    "plan_cells", "plot_benchmark_accuracy_vs_macs", "plot_time_vs_accuracy", "read_results", "results_markdown",
    "run_benchmark", "source_tasks",
]
