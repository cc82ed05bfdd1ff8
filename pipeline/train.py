"""Ray Train drivers: reference pretraining of the backbone and distributed STAMP meta-training.

Both jobs are a *per-worker loop* (plain PyTorch, no Ray imports) driven through a small
:class:`WorkerContext` (rank, world size, device, checkpoint in/out, report). Under Ray the
context wraps ``ray.train``; in tests and benchmarks :class:`LocalContext` runs the same loop in one
process, so the loop is tested without a cluster.

Meta-training (``run_meta_train``):

* ``TorchTrainer`` with ``cfg.scaling.num_workers`` workers; Ray sets up the process group (gloo on
  CPU, NCCL on GPU). The pruner's forward is not a plain module forward (gates, set encoder,
  prototype head), so instead of DDP the gradients are all-reduced in ``meta_train_step``'s
  ``grad_hook``: one flat buffer per step, plus a has-gradient flag per parameter so a parameter no
  rank touched keeps ``grad=None`` exactly as in single-process training.
* Every rank streams its own episodes (``EpisodeSampler(rank, world_size)``: disjoint shards, the
  same number of steps per epoch, so no rank waits on one that ran dry).
* Every ``report_every`` steps every rank calls ``ray.train.report`` (Ray requires equal counts);
  metrics are averaged over ranks first; rank 0 attaches a checkpoint every ``checkpoint_every``
  steps and at the end: ``pruner.json`` + ``pruner_state_dict.pt`` (``StampPruner.save``),
  ``optimizer.pt`` (a state_dict, loaded with ``weights_only=True``) and ``state.json`` (step,
  epoch, data seed, config hash, MLflow run id). The checkpoint directory is itself a loadable
  pruner directory.
* On start every rank asks ``ray.train.get_checkpoint()``: after a worker failure
  (``FailureConfig(max_failures)``) or when the job is re-run with the same ``run_name`` and
  ``storage_path`` it continues from the saved step, optimizer state included.
* Rank 0 logs metrics to MLflow (the driver creates the run and logs the config as params) and,
  when validation is on, meta-validates: prunes held-out source tasks at a fixed budget with
  ``prune_for_task`` and reports ``val_accuracy`` with the achieved ``val_macs_ratio``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import (
    ConfigError,
    MetaTrainConfig,
    PretrainConfig,
    resolved_catalog_url,
    resolved_storage_path,
    resolved_tracking_uri,
)
from stamp_core import (
    Backbone,
    MetaConfig,
    PruneSpec,
    StampPruner,
    TrainConfig,
    build_backbone,
    build_backbone_from_config,
    evaluate_accuracy,
    make_optimizer,
    meta_train_step,
    prepare_images,
    prune_for_task,
)
from stamp_core import __version__ as stamp_version
from stamp_core.pruner import load_weights

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow.fs

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
BACKBONE_CONFIG_FILE = "backbone.json"
BACKBONE_WEIGHTS_FILE = "backbone_state_dict.pt"
PRUNER_CONFIG_FILE = "pruner.json"
#: checkpoint directory names sort by step: checkpoint_00000040
CHECKPOINT_PREFIX = "checkpoint_"


# =============================================================================== worker context


class WorkerContext(Protocol):
    """What a per-worker loop needs from its runtime (Ray Train or a plain process)."""

    rank: int
    world_size: int
    device: torch.device

    def checkpoint_dir(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest checkpoint to resume from, as a local directory (None on a fresh start)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        """Report metrics (every rank, equally often) and optionally a checkpoint directory."""
        ...


class LocalContext:
    """A single-process context: checkpoints are copied to ``root/<name>``, reports are kept in memory."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        return found[-1] if found else None

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        yield self.latest_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        record = dict(metrics)
        if checkpoint_dir is not None:
            dest = self.root / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(checkpoint_dir, dest)
            record["checkpoint"] = str(dest)
        self.reports.append(record)


class RayContext:
    """``ray.train`` behind the WorkerContext interface (built inside a Ray Train worker)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        import ray.train

        import pyarrow.fs

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            yield Path(checkpoint.path)
            return
        # Each rank downloads into a private directory. Checkpoint.as_directory() shares one
        # download per node and deletes it when the first reader leaves, which corrupted the
        # other rank's reads of optimizer.pt in testing.
        with tempfile.TemporaryDirectory(prefix="stamp-restore-") as tmp:
            yield Path(checkpoint.to_directory(tmp))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


@dataclass
class WorkerSetup:
    """Values the driver resolves once (settings, catalog) and hands to every worker; no secrets."""

    catalog_url: str
    s3_endpoint: str | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


# =============================================================================== shared helpers


def _distributed(ctx: WorkerContext) -> bool:
    return ctx.world_size > 1 and dist.is_available() and dist.is_initialized()


def _set_threads(cpus: float, device: torch.device) -> None:
    # One intra-op thread per reserved CPU: more threads than CPUs oversubscribe co-located workers.
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


class _Tracker:
    """Rank 0's MLflow metric logging; a tracking outage warns once instead of killing training."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.client = None
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._warned = False
        if enabled and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        if not self._reachable(f"MLflow logging skipped at step {step} (training continues)"):
            return

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        try:
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        except Exception as exc:  # noqa: BLE001 - any tracking error
            self._warn(f"MLflow logging failed (training continues): {exc}")

    def log_plots(self, pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig,
                  at_budget: tuple[float, float, list[PruneSpec]] | None = None) -> None:
        """The end-of-run plots (see :func:`log_run_plots`); an MLflow outage only warns."""
        if self.client is None or not self._reachable("MLflow plots not logged (training result kept)"):
            return
        try:
            log_run_plots(self.client, str(self.run_id), pruner, tasks, cfg, at_budget)
        except Exception as exc:  # noqa: BLE001 - plots must never cost the trained pruner
            self._warn(f"MLflow plots not logged (training result kept): {exc}")

    def _reachable(self, what: str) -> bool:
        """One short probe: MLflow's client retries an unreachable server for minutes per call,
        which would stall training (and every other rank, through DDP)."""
        from pipeline.registry import RegistryError, check_tracking_uri

        try:
            check_tracking_uri(str(self.tracking_uri), timeout=2.0)
        except RegistryError as exc:
            self._warn(f"{what}: {exc}")
            return False
        return True

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("%s", message)
            self._warned = True


def resolve_sources(cfg_sources: Any, catalog: Any) -> list[str]:
    """``"all"`` -> every catalogued dataset; a list is checked against the catalog."""
    names = catalog.names() if cfg_sources == "all" else list(cfg_sources)
    if not names:
        raise ConfigError("data.sources: the catalog has no datasets; ingest some with `stamp ingest`")
    missing = [n for n in names if n not in catalog]
    if missing:
        known = ", ".join(catalog.names()) or "none"
        raise ConfigError(f"data.sources: {missing} not in the catalog (known: {known}); ingest with `stamp ingest`")
    return names


def _load_catalog(catalog_url: str, endpoint: str | None) -> Any:
    from pipeline import s3
    from pipeline.catalog import Catalog

    try:
        return Catalog.load(catalog_url, missing_ok=False, endpoint_url=endpoint)
    except s3.ObjectNotFoundError:
        raise ConfigError(
            f"data.catalog_url: no catalog at {catalog_url}; ingest datasets first (`stamp ingest`) "
            "or point data.catalog_url at an existing catalog.json"
        ) from None


def _s3_endpoint() -> str | None:
    from pipeline.settings import get_settings

    return get_settings().s3_endpoint


# --------------------------------------------------------------------------- storage (Ray runs)


def storage_filesystem(storage_path: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray ``(storage_path, storage_filesystem)`` for a local directory or ``s3://bucket/prefix``.

    S3 goes through ``pyarrow.fs.S3FileSystem`` with the endpoint from settings; credentials come
    from the standard AWS chain on each process (never passed here, so never pickled to workers).
    """
    if not storage_path.startswith("s3://"):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        return storage_path, None
    import pyarrow.fs

    kwargs: dict[str, Any] = {}
    endpoint = _s3_endpoint()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return storage_path[len("s3://"):], pyarrow.fs.S3FileSystem(region=region, **kwargs)


def _read_checkpoint_state(checkpoint: Any) -> dict[str, Any] | None:
    """state.json of a Ray checkpoint, read alone (no download of the weights)."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as fh:
            return json.loads(fh.read().decode())
    except (OSError, ValueError):
        return None


def latest_run_checkpoint(storage_path: str, name: str) -> tuple[Any, dict[str, Any]] | None:
    """(Ray checkpoint, its state.json) of the latest checkpoint of run ``name``, if there is one."""
    from ray.train import Result

    path, fs = storage_filesystem(storage_path)
    try:
        result = Result.from_path(f"{path.rstrip('/')}/{name}", storage_filesystem=fs)
    except (RuntimeError, OSError, ValueError):
        return None
    if result.checkpoint is None:
        return None
    state = _read_checkpoint_state(result.checkpoint)
    return (result.checkpoint, state) if state is not None else None


def checkpoint_to_local(checkpoint: Any, dest_root: Path) -> Path:
    """A local directory with the checkpoint's files (the checkpoint itself when storage is local)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    dest = dest_root / Path(checkpoint.path).name
    if not (dest / STATE_FILE).exists():
        tmp = dest.with_name(f".{dest.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        checkpoint.to_directory(str(tmp))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
    return dest


def _download_prefix(url: str, dest: Path) -> Path:
    """Copy every object under an ``s3://`` directory URL into ``dest`` (for pretrained weights)."""
    from pipeline import s3

    prefix = url.rstrip("/") + "/"
    urls = s3.list_urls(prefix)
    if not urls:
        raise FileNotFoundError(f"pretrained: nothing under {prefix}")
    for u in urls:
        rel = u[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get_bytes(u))
    return dest


# =============================================================================== backbones


def save_backbone(directory: Path, backbone: Backbone, meta: dict[str, Any]) -> None:
    """``backbone.json`` (architecture + label space) and ``backbone_state_dict.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_json(directory / BACKBONE_CONFIG_FILE, {"backbone": dict(backbone.config), **meta})
    tmp = directory / f".{BACKBONE_WEIGHTS_FILE}.tmp"
    torch.save(backbone.state_dict(), tmp)
    tmp.replace(directory / BACKBONE_WEIGHTS_FILE)


def load_backbone_dir(directory: Path) -> Backbone:
    """Rebuild a backbone saved by :func:`save_backbone` (weights with ``weights_only=True``)."""
    meta = json.loads((directory / BACKBONE_CONFIG_FILE).read_text())
    model = build_backbone_from_config(meta["backbone"])
    model.load_state_dict(load_weights(directory / BACKBONE_WEIGHTS_FILE, "cpu"))
    return model


def load_pretrained_backbone(source: str) -> Backbone:
    """A backbone from a pretrain checkpoint, a pruner directory or a Ray run directory (local or s3://).

    A run directory resolves to its latest ``checkpoint_*``.
    """
    with tempfile.TemporaryDirectory(prefix="stamp-pretrained-") as tmp:
        d = _download_prefix(source, Path(tmp)) if source.startswith("s3://") else Path(source)
        if not d.is_dir():
            raise FileNotFoundError(f"pretrained: {source} is not a directory")
        candidates = sorted(p for p in d.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        if not (d / BACKBONE_CONFIG_FILE).exists() and not (d / PRUNER_CONFIG_FILE).exists() and candidates:
            d = candidates[-1]
        if (d / BACKBONE_CONFIG_FILE).exists():
            return load_backbone_dir(d)
        if (d / PRUNER_CONFIG_FILE).exists():
            return StampPruner.load(d).backbone
        raise FileNotFoundError(
            f"pretrained: {source} holds neither {BACKBONE_CONFIG_FILE} (a pretrain checkpoint) nor "
            f"{PRUNER_CONFIG_FILE} (a pruner) nor {CHECKPOINT_PREFIX}* directories (a Ray run)"
        )


def build_pruner(cfg: MetaTrainConfig) -> StampPruner:
    """A fresh pruner for the config: the backbone is new or the pretrained one."""
    arch = cfg.pruner.model_dump()
    kwargs = dict(arch, support_per_class=cfg.episodes.support_per_class, max_support=cfg.episodes.max_support)
    if cfg.pretrained == "none":
        backbone = build_backbone(cfg.backbone, 10, **cfg.backbone_kwargs)
    else:
        backbone = load_pretrained_backbone(cfg.pretrained)
        if backbone.config["name"] != cfg.backbone:
            raise ConfigError(
                f"pretrained: {cfg.pretrained} holds a {backbone.config['name']} backbone but backbone={cfg.backbone}"
            )
    return StampPruner.create(backbone, image_size=cfg.data.image_size, **kwargs)


def _structure_to(pruner: StampPruner, device: torch.device) -> None:
    """Move the MACs cost model's tensors next to the gates (stamp_core keeps them on CPU)."""
    if device.type == "cpu":
        return
    s = pruner.structure
    for name, value in list(vars(s).items()):
        if isinstance(value, torch.Tensor):
            setattr(s, name, value.to(device))


# =============================================================================== meta-validation


@dataclass
class ValTask:
    """One held-out task: prune + fine-tune on ``x_train``, score on ``x_test``."""

    dataset: str
    classes: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def build_val_tasks(cfg: MetaTrainConfig, setup: WorkerSetup) -> list[ValTask]:
    """Deterministic held-out tasks from ``validation.split`` of the validation sources."""
    from pipeline.episodes import load_split_arrays

    vc = cfg.validation
    names = list(vc.sources or cfg.data.sources)  # sources are resolved to a list by the driver
    rng = np.random.default_rng(vc.seed)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tasks = []
    need = vc.shots + vc.test_per_class
    for t in range(vc.tasks):
        name = names[t % len(names)]
        if name not in arrays:
            arrays[name] = load_split_arrays(setup.catalog_url, name, vc.split, endpoint_url=setup.s3_endpoint)
        x, y = arrays[name]
        by_class = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        eligible = sorted(c for c, idx in by_class.items() if len(idx) >= need)
        k = min(vc.ways, len(eligible))
        if k < 2:
            raise ValueError(
                f"validation: dataset {name!r} split {vc.split!r} has {len(eligible)} classes with "
                f"{need} images (shots + test_per_class); lower them or pick other validation.sources"
            )
        classes = [int(c) for c in rng.choice(eligible, size=k, replace=False)]
        train_idx, test_idx, y_tr, y_te = [], [], [], []
        for j, c in enumerate(classes):
            picks = rng.permutation(by_class[c])[:need]
            train_idx.extend(picks[: vc.shots])
            test_idx.extend(picks[vc.shots:])
            y_tr += [j] * vc.shots
            y_te += [j] * vc.test_per_class
        tasks.append(ValTask(
            dataset=name,
            classes=classes,
            x_train=prepare_images(x[np.asarray(train_idx)], cfg.data.image_size),
            y_train=torch.tensor(y_tr, dtype=torch.int64),
            x_test=prepare_images(x[np.asarray(test_idx)], cfg.data.image_size),
            y_test=torch.tensor(y_te, dtype=torch.int64),
        ))
    return tasks


def _cpu_copy(pruner: StampPruner) -> StampPruner:
    from stamp_core import PrunerConfig

    copy = StampPruner(PrunerConfig(**asdict(pruner.config)))
    copy.load_state_dict({k: v.detach().cpu() for k, v in pruner.state_dict().items()})
    return copy


def _validate_at(pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig, macs_ratio: float
                 ) -> tuple[list[float], list[float], list[PruneSpec]]:
    """Accuracy after / before the fine-tune and the spec of every task pruned at ``macs_ratio``."""
    vc = cfg.validation
    accs, accs0, specs = [], [], []
    with torch.random.fork_rng(devices=[]):
        on_cpu = next(pruner.parameters()).device.type == "cpu"
        model = pruner if on_cpu else _cpu_copy(pruner)  # mask calibration runs on CPU
        for i, task in enumerate(tasks):
            res = prune_for_task(
                model,
                task.x_train,
                task.y_train,
                task.x_test,
                task.y_test,
                macs_ratio=macs_ratio,
                finetune=TrainConfig(epochs=vc.finetune_epochs, batch_size=vc.batch_size, lr=vc.finetune_lr,
                                     seed=vc.seed + i),
            )
            accs.append(float(res.accuracy))
            accs0.append(float(res.accuracy_before_finetune))
            specs.append(res.spec)
    return accs, accs0, specs


def meta_validate(pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig,
                  specs_out: list[PruneSpec] | None = None) -> dict[str, float]:
    """Prune every held-out task at ``validation.macs_ratio``, fine-tune briefly, score.

    Runs on a forked RNG so validating does not change the training trajectory. ``specs_out``,
    when given, receives each task's spec (the end-of-run plots reuse them).
    """
    vc = cfg.validation
    t0 = time.perf_counter()
    accs, accs0, specs = _validate_at(pruner, tasks, cfg, vc.macs_ratio)
    if specs_out is not None:
        specs_out[:] = specs
    return {
        "val_accuracy": float(np.mean(accs)),
        "val_accuracy_before_finetune": float(np.mean(accs0)),
        "val_macs_ratio": float(np.mean([s.macs_pruned / s.macs_full for s in specs])),
        "val_macs_ratio_target": vc.macs_ratio,
        "val_seconds": time.perf_counter() - t0,
    }


def log_run_plots(client: Any, run_id: str, pruner: StampPruner, tasks: list[ValTask], cfg: MetaTrainConfig,
                  at_budget: tuple[float, float, list[PruneSpec]] | None = None) -> list[str]:
    """The run's plots, as MLflow artifacts under ``plots/``; returns their artifact paths.

    ``at_budget`` = (real MACs ratio, accuracy, specs) already measured at ``validation.macs_ratio``
    (by the final :func:`meta_validate`), so that budget is not pruned and fine-tuned twice.

    * kept-channel fraction per layer for (up to six) held-out tasks at ``validation.macs_ratio``;
    * accuracy against MACs ratio over ``validation.curve_ratios`` (+ ``macs_ratio``), mean over tasks;
    * training curves from the run's metric history (so a resumed run plots its whole history).
    """
    from pipeline.registry import plot_accuracy_vs_macs, plot_kept_fractions, plot_training_curves

    vc = cfg.validation
    figures = {}
    curve: list[tuple[float, float]] = []
    kept: dict[str, PruneSpec] = {}
    for ratio in sorted({*vc.curve_ratios, vc.macs_ratio}):
        if ratio == vc.macs_ratio and at_budget is not None:
            real_ratio, acc, specs = at_budget
            curve.append((real_ratio, acc))
        else:
            accs, _, specs = _validate_at(pruner, tasks, cfg, ratio)
            curve.append((float(np.mean([s.macs_pruned / s.macs_full for s in specs])), float(np.mean(accs))))
        if ratio == vc.macs_ratio:
            kept = {f"task {i} ({t.dataset} {t.classes})": s for i, (t, s) in enumerate(zip(tasks, specs))}
    figures["plots/kept_fractions.png"] = plot_kept_fractions(kept)
    figures["plots/accuracy_vs_macs.png"] = plot_accuracy_vs_macs(
        {f"STAMP, {len(tasks)} held-out tasks, {vc.finetune_epochs} fine-tune epoch(s)": curve},
        title="Meta-validation accuracy vs MACs")
    keys = ["ce", "accuracy", "expected_macs_ratio", "macs_gap", "data_wait_fraction", "val_accuracy"]
    history: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(int(m.step), {"step": float(m.step)})[key] = float(m.value)
    records = [history[s] for s in sorted(history)]
    present = [k for k in keys if any(k in r for r in records)]
    if records and present:
        figures["plots/training_curves.png"] = plot_training_curves(records, present, title=f"Meta-training {cfg.run_name}")
    for path, fig in figures.items():
        client.log_figure(run_id, fig, path)
    return list(figures)


# =============================================================================== meta-training loop


def _allreduce_grads(pruner: StampPruner, world_size: int) -> None:
    """Average gradients over ranks in one collective; keep ``grad=None`` where no rank has one."""
    params = [p for p in pruner.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [flags])
    dist.all_reduce(flat)
    offset = 0
    total_flags = flat[-len(params):]
    for i, p in enumerate(params):
        n = p.numel()
        if total_flags[i] > 0:
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) / world_size
        else:
            p.grad = None
        offset += n


def _broadcast_state(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (and BatchNorm statistics)."""
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)


def _mean_over_ranks(values: dict[str, float], ctx: WorkerContext, device: torch.device,
                     sums: tuple[str, ...] = (), maxes: tuple[str, ...] = ()) -> dict[str, float]:
    """Average (or sum / max, for the named keys) scalar metrics over ranks."""
    if not _distributed(ctx):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    mx = torch.tensor([values[k] for k in maxes], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if len(maxes):
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    out = {k: float(v) / (1 if k in sums else ctx.world_size) for k, v in zip(keys, t.tolist())}
    out.update({k: float(v) for k, v in zip(maxes, mx.tolist())})
    return out


def _inject_fault(cfg: MetaTrainConfig, ctx: WorkerContext, step: int) -> None:
    """Testing hook: exit abruptly once (the marker file makes it happen only once)."""
    fi = cfg.fault_injection
    if fi is None or ctx.rank != fi.rank or step != fi.step:
        return
    try:
        fd = os.open(fi.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.write(fd, f"rank {ctx.rank} exited at step {step}\n".encode())
    os.close(fd)
    _emit(ctx, f"[stamp] fault injection: rank {ctx.rank} exits at step {step}")
    os._exit(1)


def _episode_stream(source: Any, first_epoch_limit: int | None) -> Iterator[Any]:
    """Episodes across epochs; the first (resumed, partial) epoch stops after ``first_epoch_limit``."""
    limit = first_epoch_limit
    while True:
        n = 0
        for episode in source:
            yield episode
            n += 1
            if limit is not None and n >= limit:
                break
        limit = None
        if n == 0:
            raise RuntimeError("the episode sampler produced no episodes for an epoch")


def write_meta_checkpoint(dest: Path, pruner: StampPruner, optimizer: torch.optim.Optimizer,
                          state: dict[str, Any]) -> Path:
    """A resumable checkpoint that is also a loadable pruner directory."""
    pruner.config.metadata = {**pruner.config.metadata, "step": state["step"], "run_name": state.get("run_name")}
    pruner.save(dest)
    tmp = dest / f".{OPTIMIZER_FILE}.tmp"
    torch.save(optimizer.state_dict(), tmp)
    tmp.replace(dest / OPTIMIZER_FILE)
    _atomic_json(dest / STATE_FILE, state)
    return dest


def meta_train_worker(cfg: MetaTrainConfig, ctx: WorkerContext, setup: WorkerSetup,
                      on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """The per-worker meta-training loop (plain PyTorch; Ray only through ``ctx``).

    ``cfg.data.sources`` must already be a list (the driver resolves ``"all"``).
    Returns the last reported metrics (plus ``checkpoint`` naming the final checkpoint directory).
    """
    from pipeline.episodes import EpisodeSampler, Prefetcher

    worker_start = time.perf_counter()
    device = ctx.device
    _set_threads(cfg.scaling.cpus_per_worker, device)
    config_hash = cfg.meta_config_hash()

    # ---- restore or build
    state: dict[str, Any] | None = None
    opt_state: dict[str, Any] | None = None
    with ctx.checkpoint_dir() as ckpt:
        if ckpt is not None:
            pruner = StampPruner.load(ckpt)
            state = json.loads((ckpt / STATE_FILE).read_text())
            opt_state = load_weights(ckpt / OPTIMIZER_FILE, device)
        else:
            torch.manual_seed(cfg.seed)  # same init on every rank (rank 0's is broadcast anyway)
            pruner = build_pruner(cfg)
    if pruner.backbone.config["name"] != cfg.backbone:
        raise ConfigError(
            f"backbone: the checkpoint of run {cfg.run_name!r} holds a {pruner.backbone.config['name']} "
            f"pruner but backbone={cfg.backbone}; use another run_name to start a new run"
        )
    if state is not None and state.get("config_hash") != config_hash and ctx.rank == 0:
        log.warning("run %s resumes with a changed configuration (hash %s -> %s)",
                    cfg.run_name, state.get("config_hash", "?")[:12], config_hash[:12])
    pruner.to(device)
    _structure_to(pruner, device)
    pruner.train()
    o = cfg.optim
    optimizer = make_optimizer(pruner, lr=o.lr, backbone_lr=o.backbone_lr, weight_decay=o.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
        for group, lr in zip(optimizer.param_groups, (o.lr, o.backbone_lr)):
            group["lr"] = lr  # the config wins over the saved rates (no schedule to restore)
    if _distributed(ctx):
        _broadcast_state(pruner)

    start_step = int(state["step"]) if state else 0
    steps_per_epoch = cfg.episodes.steps_per_epoch
    # A resumed run draws fresh data (a different seed), not a replay of the episodes before the crash.
    data_seed = cfg.seed if start_step == 0 else int(cfg.seed) * 1_000_003 + start_step
    mlflow_run_id = setup.mlflow_run_id or (state or {}).get("mlflow_run_id")
    meta_cfg = MetaConfig(kl_weight=o.kl_weight, macs_weight=o.macs_weight, head_scale=o.head_scale,
                          inner_steps=o.inner_steps, inner_lr=o.inner_lr, label_free_prob=o.label_free_prob,
                          budget_penalty=o.budget_penalty)
    # The hook all-reduces, then clips with the configured norm (meta_train_step's own 5.0 clip
    # comes after it and is a no-op for grad_clip <= 5, which the config enforces).
    grad_hook = _make_grad_hook(ctx, o.grad_clip)

    sampler = EpisodeSampler(
        setup.catalog_url,
        datasets=list(cfg.data.sources),
        weights=cfg.data.weights or None,
        image_size=cfg.data.image_size,
        ways=cfg.episodes.ways,
        support_per_class=cfg.episodes.support_per_class,
        max_support=cfg.episodes.max_support,
        query_size=cfg.episodes.query_size,
        macs_ratio_range=cfg.episodes.macs_ratio_range,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=data_seed,
        steps_per_epoch=steps_per_epoch,
        split=cfg.data.split,
        verify_sha256=cfg.data.verify_sha256,
        max_bad_fraction=cfg.data.max_bad_fraction,
        endpoint_url=setup.s3_endpoint,
    )
    sampler.set_epoch(start_step // steps_per_epoch)
    source: Any = sampler
    if cfg.data.loader_workers > 0:
        # Episodes are assembled in separate processes; persistent so their stream buffers survive epochs.
        source = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=cfg.data.loader_workers,
                                             persistent_workers=True, prefetch_factor=2,
                                             pin_memory=device.type == "cuda")
    in_epoch = start_step % steps_per_epoch
    episodes: Iterator[Any] = _episode_stream(source, steps_per_epoch - in_epoch if in_epoch else None)

    tracker = _Tracker(setup.tracking_uri, mlflow_run_id, cfg.mlflow.enabled and ctx.rank == 0)
    val_tasks: list[ValTask] | None = None
    last: dict[str, Any] = {}
    sums: dict[str, float] = {}
    wait_s = step_s = 0.0
    n_steps = 0
    interval_start = time.perf_counter()

    def report(step: int, final: bool) -> None:
        nonlocal sums, wait_s, step_s, n_steps, interval_start, val_tasks, last
        wall = time.perf_counter() - interval_start
        local = {k: v / max(n_steps, 1) for k, v in sums.items()}
        now = time.perf_counter()
        skipped = sum(v for k, v in sampler.stats.items() if k.startswith("skipped_"))
        local.update({"_wait_s": wait_s, "_step_s": step_s, "_steps": float(n_steps), "_wall": wall,
                      "skipped_samples": float(skipped),
                      "peak_rss_mb": _peak_rss_mb(), "worker_elapsed_s": now - worker_start,
                      "loop_elapsed_s": now - loop_start})
        agg = _mean_over_ranks(local, ctx, device, sums=("_wait_s", "_step_s", "_steps", "skipped_samples"),
                               maxes=("peak_rss_mb", "_wall", "worker_elapsed_s", "loop_elapsed_s"))
        metrics: dict[str, Any] = {k: v for k, v in agg.items() if not k.startswith("_")}
        metrics.update({
            "step": step,
            "epoch": step // steps_per_epoch,
            "start_step": start_step,
            "world_size": ctx.world_size,
            "episodes_per_s": agg["_steps"] / agg["_wall"] if agg["_wall"] > 0 else 0.0,
            "data_wait_fraction": agg["_wait_s"] / agg["_step_s"] if agg["_step_s"] > 0 else 0.0,
            "step_time_s": agg["_step_s"] / max(agg["_steps"], 1.0),
        })
        if "expected_macs_ratio" in metrics:
            metrics["macs_gap"] = metrics["expected_macs_ratio"] - metrics["target_macs_ratio"]
        val_due = cfg.validation.enabled and (final or (cfg.validation.every and step % cfg.validation.every == 0))
        ckpt_due = final or step % cfg.checkpoint_every == 0
        with tempfile.TemporaryDirectory(prefix="stamp-ckpt-", ignore_cleanup_errors=True) as tmp:
            ckpt_dir = None
            if ctx.rank == 0:
                final_specs: list[PruneSpec] = []
                if val_due:
                    if val_tasks is None:
                        val_tasks = build_val_tasks(cfg, setup)
                    metrics.update(meta_validate(pruner, val_tasks, cfg, final_specs))
                if ckpt_due:
                    ckpt_dir = write_meta_checkpoint(Path(tmp) / "ckpt", pruner, optimizer, {
                        "step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                        "data_seed": data_seed, "start_step": start_step, "world_size": ctx.world_size,
                        "config_hash": config_hash, "mlflow_run_id": mlflow_run_id, "run_name": cfg.run_name,
                        "time": time.time(), "stamp_version": stamp_version,
                    })
                tracker.log(metrics, step)
                if final and val_due:
                    tracker.log_plots(pruner, val_tasks, cfg,
                                      (metrics["val_macs_ratio"], metrics["val_accuracy"], final_specs))
                _print_progress(ctx, cfg, metrics)
            name = f"{CHECKPOINT_PREFIX}{step:08d}"
            ctx.report(metrics, ckpt_dir, name)
        last = dict(metrics)
        if ckpt_dir is not None:
            last["checkpoint"] = name
        sums, wait_s, step_s, n_steps = {}, 0.0, 0.0, 0
        interval_start = time.perf_counter()

    step = start_step
    loop_start = interval_start = time.perf_counter()
    if step >= cfg.steps:
        # Nothing left to do (a re-run of a finished run): one report keeps every rank in step.
        _report_done(ctx, step, start_step)
        return {"step": step, "start_step": start_step, "already_done": True}
    if cfg.data.prefetch > 0:
        episodes = Prefetcher(episodes, cfg.data.prefetch)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            episode = next(episodes)
            t1 = time.perf_counter()
            parts = meta_train_step(pruner, episode.to(device), optimizer, meta_cfg, grad_hook=grad_hook)
            step += 1
            wait_s += t1 - t0
            step_s += time.perf_counter() - t0
            n_steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if on_step is not None:
                on_step(step, parts)
            _inject_fault(cfg, ctx, step)
            if step % cfg.report_every == 0 or step == cfg.steps:
                report(step, final=step == cfg.steps)
    finally:
        if isinstance(episodes, Prefetcher):
            episodes.close()
    return last


def _report_done(ctx: WorkerContext, step: int, start_step: int) -> None:
    ctx.report({"step": step, "start_step": start_step, "already_done": 1}, None, "")


def _make_grad_hook(ctx: WorkerContext, clip: float) -> Callable[[StampPruner], None]:
    distributed = _distributed(ctx)

    def hook(pruner: StampPruner) -> None:
        if distributed:
            _allreduce_grads(pruner, ctx.world_size)
        # Clip here with the configured norm; meta_train_step's own clip at 5.0 is then a no-op
        # whenever clip <= 5.
        torch.nn.utils.clip_grad_norm_(pruner.parameters(), clip)

    return hook


def _emit(ctx: WorkerContext, message: str) -> None:
    """Progress lines: Ray Train workers log them (Train patches print() into a duplicating tee)."""
    if isinstance(ctx, RayContext):
        log.info(message)
    else:
        print(message, flush=True)


def _print_progress(ctx: WorkerContext, cfg: MetaTrainConfig, m: dict[str, Any]) -> None:
    val = f" val_acc {m['val_accuracy']:.3f} @ MACs {m['val_macs_ratio']:.2f}" if "val_accuracy" in m else ""
    _emit(
        ctx,
        f"[stamp meta-train {cfg.run_name}] step {m['step']}/{cfg.steps} loss {m.get('loss', float('nan')):.4f} "
        f"ce {m.get('ce', float('nan')):.4f} E[MACs] {m.get('expected_macs_ratio', float('nan')):.3f} "
        f"(target {m.get('target_macs_ratio', float('nan')):.3f}) {m['episodes_per_s']:.2f} ep/s "
        f"data-wait {100 * m['data_wait_fraction']:.0f}%{val}",
    )


def _meta_train_loop_ray(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point on every worker."""
    cfg = MetaTrainConfig.model_validate(config["cfg"])
    return meta_train_worker(cfg, RayContext(), WorkerSetup(**config["setup"]))


# =============================================================================== drivers (shared)


@dataclass
class MetaTrainResult:
    """What a meta-training run produced."""

    name: str
    path: str  #: the Ray run directory on its storage
    step: int  #: last step with a checkpoint
    start_step: int  #: where the last attempt started (0 for a fresh run)
    metrics: dict[str, Any]  #: metrics reported with the final checkpoint
    checkpoint: Any  #: ray.train.Checkpoint of the final pruner
    pruner_dir: Path  #: local directory loadable with StampPruner.load
    mlflow_run_id: str | None
    result: Any = field(repr=False, default=None)  #: the ray.train.Result

    def load_pruner(self) -> StampPruner:
        return StampPruner.load(self.pruner_dir)


@dataclass
class PretrainResult:
    """What a pretraining run produced."""

    name: str
    path: str
    epoch: int
    metrics: dict[str, Any]
    checkpoint: Any
    backbone_dir: Path  #: local directory: backbone.json + backbone_state_dict.pt (a `pretrained:` source)
    mlflow_run_id: str | None
    result: Any = field(repr=False, default=None)

    def load_backbone(self) -> Backbone:
        return load_backbone_dir(self.backbone_dir)


def prepare_meta_train(cfg: MetaTrainConfig) -> tuple[MetaTrainConfig, WorkerSetup, Any]:
    """Resolve settings and check the config against the catalog, before any cluster work.

    Returns a copy of the config with ``data.sources`` (and validation sources) as explicit lists,
    the worker setup, and the catalog.
    """
    cfg = cfg.model_copy(deep=True)
    endpoint = _s3_endpoint()
    catalog_url = resolved_catalog_url(cfg.data)
    catalog = _load_catalog(catalog_url, endpoint)
    cfg.data.sources = resolve_sources(cfg.data.sources, catalog)
    lo = cfg.episodes.ways[0]
    for name in cfg.data.sources:
        entry = catalog.get(name)
        if cfg.data.split not in entry.splits:
            raise ConfigError(f"data.split: dataset {name!r} has no split {cfg.data.split!r} (it has {sorted(entry.splits)})")
        if entry.num_classes < lo:
            raise ConfigError(f"episodes.ways: dataset {name!r} has {entry.num_classes} classes, fewer than ways min {lo}")
        # Each rank reads a disjoint 1/num_workers of the split; an episode needs, per class, its
        # support images plus its share of the query batch. Catch a hopeless shape here rather
        # than as a worker error that FailureConfig would retry.
        per_class = entry.split(cfg.data.split).samples / entry.num_classes / cfg.scaling.num_workers
        k = min(lo, entry.num_classes)
        need = max(1, min(cfg.episodes.support_per_class, cfg.episodes.max_support // k)) + math.ceil(
            cfg.episodes.query_size / k)
        if per_class < need:
            raise ConfigError(
                f"episodes: a {k}-way episode needs {need} images per class on every worker, but dataset "
                f"{name!r} has about {per_class:.0f} per class per worker ({entry.split(cfg.data.split).samples} "
                f"images, {entry.num_classes} classes, {cfg.scaling.num_workers} workers); lower "
                "episodes.support_per_class / episodes.query_size, raise episodes.ways min, or use fewer workers"
            )
    if cfg.validation.enabled:
        vsources = cfg.validation.sources or cfg.data.sources
        try:
            resolve_sources(vsources, catalog)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("data.sources", "validation.sources")) from None
        for name in vsources:
            entry = catalog.get(name)
            if cfg.validation.split not in entry.splits:
                raise ConfigError(
                    f"validation.split: dataset {name!r} has no split {cfg.validation.split!r} "
                    f"(it has {sorted(entry.splits)}); meta-validation needs a held-out split"
                )
            if entry.num_classes < 2:
                raise ConfigError(f"validation.sources: dataset {name!r} has fewer than 2 classes")
    if cfg.pretrained != "none" and not cfg.pretrained.startswith("s3://") and not Path(cfg.pretrained).is_dir():
        raise ConfigError(f"pretrained: {cfg.pretrained} is not a directory")
    _pin_locations(cfg, catalog_url)
    setup = WorkerSetup(catalog_url=catalog_url, s3_endpoint=endpoint,
                        tracking_uri=resolved_tracking_uri(cfg.mlflow) if cfg.mlflow.enabled else None)
    return cfg, setup, catalog


def _pin_locations(cfg: MetaTrainConfig | PretrainConfig, catalog_url: str) -> None:
    """Write the resolved catalog, storage and tracking locations into the config.

    Processes Ray starts later (Tune trial drivers, workers) may see another environment than
    this driver; the config they receive must not be resolved again. A tracking URI with
    embedded credentials is left unpinned (configs never carry secrets).
    """
    cfg.data.catalog_url = catalog_url
    cfg.storage_path = resolved_storage_path(cfg.storage_path)
    if cfg.mlflow.enabled:
        uri = resolved_tracking_uri(cfg.mlflow)
        # One short probe: MLflow's client would otherwise retry an unreachable server for minutes.
        from pipeline.registry import check_tracking_uri
        from pipeline.settings import get_settings

        get_settings().state_dir.mkdir(parents=True, exist_ok=True)  # home of the default sqlite store
        check_tracking_uri(uri)
        if not cfg.mlflow.tracking_uri and ("://" not in uri or not urlsplit(uri).password):
            cfg.mlflow.tracking_uri = uri


def _mlflow_run(cfg: MetaTrainConfig | PretrainConfig, kind: str, name: str, prior_run_id: str | None,
                tags: dict[str, str], parent_run_id: str | None = None) -> str | None:
    """Create (or, on resume, reopen) the MLflow run the workers log into; params = the config."""
    if not cfg.mlflow.enabled:
        return None
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolved_tracking_uri(cfg.mlflow))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.mlflow.experiment)
    params = cfg.flat_params()
    if prior_run_id:
        try:
            run = client.get_run(prior_run_id)
            client.update_run(prior_run_id, status="RUNNING")
            changed = {k: v for k, v in params.items() if run.data.params.get(k) not in (None, v[:6000])}
            new = {k: v for k, v in params.items() if k not in run.data.params}
            client.log_batch(prior_run_id, params=[Param(k, v[:6000]) for k, v in new.items()],
                             tags=[RunTag(f"resumed.{k}", v[:5000]) for k, v in changed.items()])
            return prior_run_id
        except MlflowException:
            log.warning("MLflow run %s of the checkpoint is gone; starting a new one", prior_run_id)
    all_tags = {"stamp.kind": kind, "stamp.ray_run": name, "stamp.version": stamp_version, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def _end_mlflow_run(cfg: MetaTrainConfig | PretrainConfig, run_id: str | None, ok: bool) -> None:
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    from pipeline.registry import check_tracking_uri, redact

    uri = resolved_tracking_uri(cfg.mlflow)
    try:
        check_tracking_uri(uri)  # MLflow's own retries would hold the finished job for minutes
        MlflowClient(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")
    except Exception as exc:  # noqa: BLE001 - RegistryError or any MLflow error: tracking must not hide the outcome
        where = f"{cfg.storage_path}/{cfg.run_name}"
        hint = (f"; once MLflow is back, register the pruner with `stamp register --from-checkpoint {where}`"
                if isinstance(cfg, MetaTrainConfig) else "")
        log.warning("could not close MLflow run %s at %s: %s The checkpoints are kept in %s%s",
                    run_id, redact(uri), str(exc).rstrip(".") + ".", where, hint)


def _fit(trainer: Any, cfg: MetaTrainConfig | PretrainConfig, run_id: str | None, what: str) -> Any:
    """``trainer.fit()``; close the MLflow run either way; the result must hold a checkpoint."""
    ok = False
    try:
        result = trainer.fit()
        ok = result.error is None
    finally:
        _end_mlflow_run(cfg, run_id, ok)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what} finished without a checkpoint")
    return result


def _scaling(cfg: MetaTrainConfig | PretrainConfig) -> Any:
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                         resources_per_worker=resources)


def _local_root(kind: str, name: str) -> Path:
    from pipeline.settings import get_settings

    root = get_settings().state_dir / "checkpoints" / kind / name
    root.mkdir(parents=True, exist_ok=True)
    return root


# =============================================================================== meta-train driver


def run_meta_train(cfg: MetaTrainConfig, *, name: str | None = None, callbacks: list[Any] | None = None,
                   mlflow_parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None
                   ) -> MetaTrainResult:
    """Meta-train a pruner with Ray Train; resumes when ``run_name`` already has a checkpoint.

    Args:
        cfg: the validated config.
        name: Ray run name override (Tune trials); default ``cfg.run_name``.
        callbacks: Ray Train ``UserCallback`` s (Tune passes ``TuneReportCallback``).
        mlflow_parent_run_id: nest the MLflow run under this one (a Tune job's run).
        extra_tags: more MLflow tags.

    Raises:
        ConfigError: the config does not fit the catalog (checked before Ray starts anything).
        ray.train.TrainingFailedError: training failed more than ``max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg, setup, catalog = prepare_meta_train(cfg)
    name = name or cfg.run_name
    cfg.run_name = name
    storage = cfg.storage_path or resolved_storage_path(None)
    prior = latest_run_checkpoint(storage, name)
    prior_state = prior[1] if prior else None
    if prior_state:
        print(f"[stamp meta-train {name}] resuming from step {prior_state.get('step')} "
              f"(target {cfg.steps}) in {storage}/{name}", flush=True)
    tags = {"stamp.catalog_hash": catalog.content_hash(), "stamp.config_hash": cfg.meta_config_hash(),
            "stamp.storage_path": storage, **(extra_tags or {})}
    run_id = _mlflow_run(cfg, "meta_train", name, (prior_state or {}).get("mlflow_run_id"), tags,
                         mlflow_parent_run_id)
    setup.mlflow_run_id = run_id
    path, fs = storage_filesystem(storage)
    trainer = TorchTrainer(
        _meta_train_loop_ray,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "setup": asdict(setup)},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )
    result = _fit(trainer, cfg, run_id, f"meta-training run {name}")
    state = _read_checkpoint_state(result.checkpoint) or {}
    pruner_dir = checkpoint_to_local(result.checkpoint, _local_root("meta_train", name))
    metrics = dict(result.metrics or {})
    return_value = result.return_value or {}
    return MetaTrainResult(
        name=name,
        path=str(result.path),
        step=int(state.get("step", metrics.get("step", 0))),
        start_step=int(return_value.get("start_step", metrics.get("start_step", 0))),
        metrics=metrics,
        checkpoint=result.checkpoint,
        pruner_dir=pruner_dir,
        mlflow_run_id=run_id,
        result=result,
    )


# =============================================================================== pretraining


def _random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    _, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


@dataclass
class _JointData:
    """Per-dataset uint8 images (native size) with labels in the joint label space."""

    images: list[np.ndarray]
    labels: list[np.ndarray]

    def __len__(self) -> int:
        return sum(len(y) for y in self.labels)

    def batch(self, index: np.ndarray, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of global indices, prepared per dataset (sizes and channels may differ)."""
        bounds = np.cumsum([0] + [len(y) for y in self.labels])
        xs, ys = [], []
        for d in range(len(self.labels)):
            local = index[(index >= bounds[d]) & (index < bounds[d + 1])] - bounds[d]
            if len(local):
                xs.append(prepare_images(self.images[d][local], image_size))
                ys.append(torch.as_tensor(self.labels[d][local]))
        return torch.cat(xs), torch.cat(ys)


def label_space(catalog: Any, names: list[str]) -> list[dict[str, Any]]:
    """Joint label space: each dataset's classes follow the previous datasets' (``offset``)."""
    out, offset = [], 0
    for n in names:
        entry = catalog.get(n)
        out.append({"dataset": n, "offset": offset, "num_classes": entry.num_classes,
                    "class_names": list(entry.class_names)})
        offset += entry.num_classes
    return out


def _read_rank_share(cfg: PretrainConfig, setup: WorkerSetup, labels: list[dict[str, Any]],
                     rank: int, world_size: int) -> _JointData:
    from pipeline.episodes import iter_samples

    images, ys = [], []
    cap = None if cfg.max_samples_per_dataset is None else max(1, cfg.max_samples_per_dataset // world_size)
    for spec in labels:
        stream = iter_samples(setup.catalog_url, spec["dataset"], cfg.data.split, rank=rank, world_size=world_size,
                              verify_sha256=cfg.data.verify_sha256, max_bad_fraction=cfg.data.max_bad_fraction,
                              endpoint_url=setup.s3_endpoint)
        xs, y = [], []
        for sample in stream:
            xs.append(sample.image)
            y.append(sample.label + spec["offset"])
            if cap is not None and len(y) >= cap:
                break
        if not xs:
            raise RuntimeError(f"rank {rank} read no samples of {spec['dataset']!r}; use fewer workers or more shards")
        images.append(np.stack(xs))
        ys.append(np.asarray(y, dtype=np.int64))
    return _JointData(images, ys)


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 15% of the steps, then cosine decay (stateless: resumes exactly)."""
    warm = max(1, int(0.15 * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain_worker(cfg: PretrainConfig, ctx: WorkerContext, setup: WorkerSetup,
                    labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-worker supervised pretraining loop on this rank's shards of every source dataset."""
    device = ctx.device
    _set_threads(cfg.scaling.cpus_per_worker, device)
    data = _read_rank_share(cfg, setup, labels, ctx.rank, ctx.world_size)
    n_local = len(data)
    n = n_local
    if _distributed(ctx):  # every rank must take the same number of steps (DDP would hang otherwise)
        t = torch.tensor([n_local], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t.item())
    steps_per_epoch = max(1, n // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    num_classes = sum(s["num_classes"] for s in labels)

    start_epoch = 0
    with ctx.checkpoint_dir() as ckpt:
        if ckpt is not None:
            model = load_backbone_dir(ckpt)
            state = json.loads((ckpt / STATE_FILE).read_text())
            opt_state = load_weights(ckpt / OPTIMIZER_FILE, device)
            start_epoch = int(state["epoch"])
        else:
            torch.manual_seed(cfg.seed)
            model = build_backbone(cfg.backbone, num_classes, **cfg.backbone_kwargs)
            opt_state = None
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    net: torch.nn.Module = model
    if _distributed(ctx):
        _broadcast_state(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    eval_sets: list[tuple[torch.Tensor, torch.Tensor]] = []
    if ctx.rank == 0 and cfg.eval_samples > 0:
        from pipeline.episodes import load_split_arrays

        for spec in labels:
            try:
                x, y = load_split_arrays(setup.catalog_url, spec["dataset"], "test", endpoint_url=setup.s3_endpoint)
            except KeyError:
                continue  # no test split: train accuracy only
            keep = np.random.default_rng(cfg.seed).permutation(len(y))[: cfg.eval_samples]
            if len(keep):
                eval_sets.append((prepare_images(x[keep], cfg.data.image_size), torch.as_tensor(y[keep] + spec["offset"])))

    tracker = _Tracker(setup.tracking_uri, setup.mlflow_run_id, cfg.mlflow.enabled and ctx.rank == 0)
    last: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch, ctx.rank])
        order = rng.permutation(n_local)[: steps_per_epoch * cfg.batch_size]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 131 + ctx.rank)
        loss_sum = correct = seen = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(step, total_steps, cfg.lr)
            xb, yb = data.batch(np.sort(order[i * cfg.batch_size:(i + 1) * cfg.batch_size]), cfg.data.image_size)
            if cfg.augment:
                xb = _random_shift(xb, 2, gen)
            xb, yb = xb.to(device), yb.to(device)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(yb)
            correct += float((logits.argmax(1) == yb).sum())
            seen += len(yb)
        local = {"loss": loss_sum / seen, "train_accuracy": correct / seen, "_samples": seen,
                 "_wall": time.perf_counter() - t0}
        agg = _mean_over_ranks(local, ctx, device, sums=("_samples",), maxes=("_wall",))
        metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": agg["loss"], "train_accuracy": agg["train_accuracy"],
                                   "samples_per_s": agg["_samples"] / agg["_wall"],
                                   "lr": float(optimizer.param_groups[0]["lr"])}
        with tempfile.TemporaryDirectory(prefix="stamp-ckpt-", ignore_cleanup_errors=True) as tmp:
            ckpt_dir = None
            if ctx.rank == 0:
                if eval_sets:
                    accs = [evaluate_accuracy(model, x.to(device), y.to(device)) for x, y in eval_sets]
                    metrics["test_accuracy"] = float(np.mean(accs))
                ckpt_dir = Path(tmp) / "ckpt"
                save_backbone(ckpt_dir, model, {"image_size": cfg.data.image_size, "labels": labels,
                                                "epoch": epoch + 1, "run_name": cfg.run_name})
                torch.save(optimizer.state_dict(), ckpt_dir / OPTIMIZER_FILE)
                _atomic_json(ckpt_dir / STATE_FILE, {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                                                    "config_hash": cfg.config_hash(exclude=("run_name", "epochs")),
                                                    "mlflow_run_id": setup.mlflow_run_id, "run_name": cfg.run_name})
                tracker.log(metrics, epoch + 1)
                acc = f" test_acc {metrics['test_accuracy']:.3f}" if "test_accuracy" in metrics else ""
                _emit(ctx, f"[stamp pretrain {cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} loss {metrics['loss']:.4f} "
                      f"train_acc {metrics['train_accuracy']:.3f}{acc} {metrics['samples_per_s']:.0f} img/s")
            ctx.report(metrics, ckpt_dir, f"{CHECKPOINT_PREFIX}{epoch + 1:08d}")
        last = metrics
    return last


def _pretrain_loop_ray(config: dict[str, Any]) -> dict[str, Any]:
    cfg = PretrainConfig.model_validate(config["cfg"])
    return pretrain_worker(cfg, RayContext(), WorkerSetup(**config["setup"]), config["labels"])


def prepare_pretrain(cfg: PretrainConfig) -> tuple[PretrainConfig, WorkerSetup, list[dict[str, Any]], Any]:
    """Resolve settings and the joint label space, before any cluster work."""
    cfg = cfg.model_copy(deep=True)
    endpoint = _s3_endpoint()
    catalog_url = resolved_catalog_url(cfg.data)
    catalog = _load_catalog(catalog_url, endpoint)
    cfg.data.sources = resolve_sources(cfg.data.sources, catalog)
    for n in cfg.data.sources:
        if cfg.data.split not in catalog.get(n).splits:
            raise ConfigError(f"data.split: dataset {n!r} has no split {cfg.data.split!r}")
    _pin_locations(cfg, catalog_url)
    setup = WorkerSetup(catalog_url=catalog_url, s3_endpoint=endpoint,
                        tracking_uri=resolved_tracking_uri(cfg.mlflow) if cfg.mlflow.enabled else None)
    return cfg, setup, label_space(catalog, list(cfg.data.sources)), catalog


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Supervised reference pretraining of ``cfg.backbone`` on the union of the sources (Ray Train, DDP).

    Re-running with the same ``run_name`` and ``storage_path`` continues from the last epoch.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg, setup, labels, catalog = prepare_pretrain(cfg)
    storage = cfg.storage_path or resolved_storage_path(None)
    prior = latest_run_checkpoint(storage, cfg.run_name)
    run_id = _mlflow_run(cfg, "pretrain", cfg.run_name, (prior[1] if prior else {}).get("mlflow_run_id"),
                         {"stamp.catalog_hash": catalog.content_hash(), "stamp.storage_path": storage})
    setup.mlflow_run_id = run_id
    path, fs = storage_filesystem(storage)
    trainer = TorchTrainer(
        _pretrain_loop_ray,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "setup": asdict(setup), "labels": labels},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    result = _fit(trainer, cfg, run_id, f"pretraining run {cfg.run_name}")
    state = _read_checkpoint_state(result.checkpoint) or {}
    return PretrainResult(
        name=cfg.run_name,
        path=str(result.path),
        epoch=int(state.get("epoch", 0)),
        metrics=dict(result.metrics or {}),
        checkpoint=result.checkpoint,
        backbone_dir=checkpoint_to_local(result.checkpoint, _local_root("pretrain", cfg.run_name)),
        mlflow_run_id=run_id,
        result=result,
    )
