"""Distributed STAMP meta-training with Ray Train: the per-worker loop and its driver ``run_meta_train``.

* ``TorchTrainer`` with ``cfg.scaling.num_workers`` workers; Ray sets up the process group (gloo on
  CPU, NCCL on GPU). The pruner's forward is not a plain module forward (gates, set encoder,
  prototype head), so instead of DDP the gradients are all-reduced in ``meta_train_step``'s
  ``grad_hook``: one flat buffer per step, plus a has-gradient flag per parameter so a parameter no
  rank touched keeps ``grad=None`` exactly as in single-process training.
* Every rank streams its own episodes (``EpisodeSampler(rank, world_size)``: its share of the
  datasets, disjoint shards where ranks share one, the same number of steps per epoch, so no rank
  waits on one that ran dry); episode counts per dataset and base, summed over ranks, go to MLflow
  with every report and as ``episode_counts.json`` at the end.
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

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, MetaTrainConfig, resolved_catalog_url, resolved_storage_path, resolved_tracking_uri
from pipeline.data import (
    CHECKPOINT_PREFIX,
    OPTIMIZER_FILE,
    STATE_FILE,
    EpisodeCounts,
    EpisodeSampler,
    Prefetcher,
    checkpoint_to_local,
    latest_run_checkpoint,
    read_checkpoint_state,
    storage_filesystem,
    write_meta_checkpoint,
)
from pipeline.registry.backbones import load_backbone
from pipeline.registry.loading import pin_model_uri
from pipeline.training.context import RayContext, WorkerContext, WorkerSetup, emit, peak_rss_mb, set_threads
from pipeline.training.distributed import allreduce_grads, average_buffers, broadcast_state, is_distributed, mean_over_ranks
from pipeline.training.driver import (
    alive_ray_nodes,
    check_locations_reach_every_node,
    fit,
    load_catalog,
    ReportHandler,
    local_root,
    pin_locations,
    relay_reports,
    resolve_sources,
    s3_endpoint,
    scaling_config,
    torch_config,
)
from pipeline.training.tracking import Tracker, start_mlflow_run
from pipeline.training.validation import ValTask, build_val_tasks, log_run_plots, meta_validate
from stamp_core import PruneSpec, StampPruner, build_backbone, make_optimizer, meta_train_step
from stamp_core import __version__ as stamp_version
from stamp_core.pruner import load_weights

log = logging.getLogger(__name__)


def build_pruner(cfg: MetaTrainConfig) -> StampPruner:
    """A fresh pruner for the config: the backbone is new or the pretrained one."""
    arch = cfg.pruner.model_dump()
    kwargs = dict(arch, support_per_class=cfg.episodes.support_per_class, max_support=cfg.episodes.max_support)
    if cfg.pretrained == "none":
        backbone = build_backbone(cfg.backbone, 10, **cfg.backbone_kwargs)
    else:
        # models:/ URIs resolve against the same tracking server the run logs to
        backbone = load_backbone(cfg.pretrained, tracking_uri=resolved_tracking_uri(cfg.mlflow))
        if backbone.config["name"] != cfg.backbone:
            raise ConfigError(
                f"pretrained: {cfg.pretrained} holds a {backbone.config['name']} backbone but backbone={cfg.backbone}"
            )
    return StampPruner.create(backbone, image_size=cfg.data.image_size, **kwargs)


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
    emit(ctx, f"[stamp] fault injection: rank {ctx.rank} exits at step {step}")
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


def meta_train_worker(cfg: MetaTrainConfig, ctx: WorkerContext, setup: WorkerSetup,
                      on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """The per-worker meta-training loop (plain PyTorch; Ray only through ``ctx``).

    ``cfg.data.sources`` must already be a list (the driver resolves ``"all"``).
    Returns the last reported metrics (plus ``checkpoint`` naming the final checkpoint directory).
    """
    return MetaTrainRecipe(cfg, ctx, setup, on_step).train()


@dataclass
class _Interval:
    """What this rank's steps since the last report add up to."""

    sums: dict[str, float] = field(default_factory=dict)  #: per loss part, summed over steps
    wait_s: float = 0.0  #: waiting for episodes
    step_s: float = 0.0  #: whole steps, the wait included
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, parts: dict[str, Any], wait_s: float, step_s: float) -> None:
        self.wait_s += wait_s
        self.step_s += step_s
        self.steps += 1
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)


class MetaTrainRecipe:
    """One worker's meta-training, in the order it happens.

    ``__init__`` is the setup (restore or build the pruner, optimizer, episode stream, tracker);
    :meth:`train` is the loop: :meth:`train_step` per step and, every ``report_every`` steps,
    :meth:`report`, which averages the interval's metrics over ranks (:meth:`interval_metrics`),
    then on rank 0 meta-validates (:meth:`validate`) and writes the checkpoint (:meth:`checkpoint`),
    and hands both to ``ctx.report`` on every rank (a barrier).
    """

    def __init__(self, cfg: MetaTrainConfig, ctx: WorkerContext, setup: WorkerSetup,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.worker_start = time.perf_counter()
        self.cfg, self.ctx, self.setup, self.on_step = cfg, ctx, setup, on_step
        self.device = ctx.device
        set_threads(cfg.scaling.cpus_per_worker, self.device)
        self.config_hash = cfg.meta_config_hash()
        self.pruner, state, opt_state = _restore_or_build(cfg, ctx, self.config_hash)
        self.optimizer = _optimizer(self.pruner, cfg, opt_state)
        if is_distributed(ctx):
            broadcast_state(self.pruner)
        self.start_step = int(state["step"]) if state else 0
        # A resumed run draws fresh data (a different seed), not a replay of the episodes before the crash.
        self.data_seed = cfg.seed if self.start_step == 0 else int(cfg.seed) * 1_000_003 + self.start_step
        self.mlflow_run_id = setup.mlflow_run_id or (state or {}).get("mlflow_run_id")
        self.meta_cfg = cfg.optim.meta_config()
        # The hook all-reduces, then clips with the configured norm (meta_train_step's own 5.0 clip
        # comes after it and is a no-op for grad_clip <= 5, which the config enforces).
        self.grad_hook = _make_grad_hook(ctx, cfg.optim.grad_clip)
        self.sampler, self.episodes = _episode_stream_for(cfg, ctx, setup, self.start_step, self.data_seed)
        self.counts = EpisodeCounts(self.sampler.entries)  # this attempt's episodes, summed over ranks when reported
        self.tracker = Tracker(setup.tracking_uri, self.mlflow_run_id, cfg.mlflow.enabled and ctx.rank == 0)
        self.val_tasks: list[ValTask] | None = None
        self.last: dict[str, Any] = {}
        self.interval = _Interval()
        self.loop_start = self.interval.start

    # ---------------------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Steps from the restored one to ``cfg.steps``; returns the last reported metrics."""
        cfg, step = self.cfg, self.start_step
        self.loop_start = self.interval.start = time.perf_counter()
        if step >= cfg.steps:
            # Nothing left to do (a re-run of a finished run): one report keeps every rank in step.
            _report_done(self.ctx, step, self.start_step)
            return {"step": step, "start_step": self.start_step, "already_done": True}
        if step == 0 and self.ctx.rank == 0 and cfg.validation.enabled and cfg.validation.at_start:
            # The step-0 point of every validation curve: what the pruner does before meta-training
            # (for an L1-start channel generator, L1's mask up to the classifier columns torch-pruning counts
            # in the last group: the reference scores the task's prototype head, as the benchmark does).
            self.tracker.log(meta_validate(self.pruner, self._val_tasks(), cfg), 0)
        episodes = Prefetcher(self.episodes, cfg.data.prefetch) if cfg.data.prefetch > 0 else self.episodes
        try:
            while step < cfg.steps:
                step = self.train_step(step, episodes)
                if step % cfg.report_every == 0 or step == cfg.steps:
                    self.report(step, final=step == cfg.steps)
        finally:
            if isinstance(episodes, Prefetcher):
                episodes.close()
        return self.last

    def train_step(self, step: int, episodes: Iterator[Any]) -> int:
        """One optimiser step on ``episodes.per_step`` episodes; returns the new step number."""
        t0 = time.perf_counter()
        batch = [next(episodes).to(self.device) for _ in range(self.cfg.episodes.per_step)]
        t1 = time.perf_counter()
        self.counts.add(batch)
        parts = meta_train_step(self.pruner, batch, self.optimizer, self.meta_cfg, grad_hook=self.grad_hook)
        step += 1
        self.interval.add(parts, t1 - t0, time.perf_counter() - t0)
        if self.on_step is not None:
            self.on_step(step, parts)
        _inject_fault(self.cfg, self.ctx, step)
        return step

    def report(self, step: int, final: bool) -> None:
        """Every rank: the interval's metrics; rank 0: validation, checkpoint, MLflow; then ``ctx.report``."""
        cfg = self.cfg
        metrics = self.interval_metrics(step)
        val_due = cfg.validation.enabled and (final or bool(cfg.validation.every and step % cfg.validation.every == 0))
        ckpt_due = final or step % cfg.checkpoint_every == 0
        with tempfile.TemporaryDirectory(prefix="stamp-ckpt-", ignore_cleanup_errors=True) as tmp:
            ckpt_dir = None
            if self.ctx.rank == 0:
                final_specs: list[PruneSpec] = []
                if val_due:
                    metrics.update(self.validate(final_specs))
                if ckpt_due:
                    ckpt_dir = self.checkpoint(step, Path(tmp) / "ckpt")
                self._log(metrics, step, final, val_due, final_specs)
            name = f"{CHECKPOINT_PREFIX}{step:08d}"
            self.ctx.report(metrics, ckpt_dir, name)
        self.last = dict(metrics)
        if ckpt_dir is not None:
            self.last["checkpoint"] = name
        self.interval = _Interval()

    # ---------------------------------------------------------------------- what a report holds

    def interval_metrics(self, step: int) -> dict[str, Any]:
        """The interval's losses and throughput, averaged (or summed, or maxed) over ranks: a collective."""
        iv, sampler, now = self.interval, self.sampler, time.perf_counter()
        local = {k: v / max(iv.steps, 1) for k, v in iv.sums.items()}
        skipped = sum(v for k, v in sampler.stats.items() if k.startswith("skipped_"))
        local.update({"_wait_s": iv.wait_s, "_step_s": iv.step_s, "_steps": float(iv.steps), "_wall": now - iv.start,
                      "skipped_samples": float(skipped),
                      "peak_rss_mb": peak_rss_mb(), "worker_elapsed_s": now - self.worker_start,
                      "loop_elapsed_s": now - self.loop_start, "open_streams_peak": sampler.stats["open_streams_peak"],
                      "s3_gets": sampler.stats["gets"], **self.counts.metrics()})
        agg = mean_over_ranks(local, self.ctx, self.device,
                              sums=("_wait_s", "_step_s", "_steps", "skipped_samples", "s3_gets", *self.counts.metrics()),
                              maxes=("peak_rss_mb", "_wall", "worker_elapsed_s", "loop_elapsed_s", "open_streams_peak"))
        steps_per_epoch = self.cfg.episodes.steps_per_epoch
        metrics: dict[str, Any] = {k: v for k, v in agg.items() if not k.startswith("_")}
        metrics.update({
            "step": step,
            "epoch": step // steps_per_epoch,
            "start_step": self.start_step,
            "world_size": self.ctx.world_size,
            "episodes_per_s": agg["_steps"] * self.cfg.episodes.per_step / agg["_wall"] if agg["_wall"] > 0 else 0.0,
            "data_wait_fraction": agg["_wait_s"] / agg["_step_s"] if agg["_step_s"] > 0 else 0.0,
            "step_time_s": agg["_step_s"] / max(agg["_steps"], 1.0),
        })
        if "expected_macs_ratio" in metrics:
            metrics["macs_gap"] = metrics["expected_macs_ratio"] - metrics["target_macs_ratio"]
        return metrics

    def validate(self, final_specs: list[PruneSpec]) -> dict[str, float]:
        """Rank 0: meta-validation on held-out source tasks (built once, on first use)."""
        return meta_validate(self.pruner, self._val_tasks(), self.cfg, final_specs)

    def checkpoint(self, step: int, dest: Path) -> Path:
        """Rank 0: the pruner, the optimizer and where the run stands, as one loadable directory."""
        steps_per_epoch = self.cfg.episodes.steps_per_epoch
        return write_meta_checkpoint(dest, self.pruner, self.optimizer, {
            "step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
            "data_seed": self.data_seed, "start_step": self.start_step, "world_size": self.ctx.world_size,
            "config_hash": self.config_hash, "mlflow_run_id": self.mlflow_run_id, "run_name": self.cfg.run_name,
            "time": time.time(), "stamp_version": stamp_version,
        })

    def _log(self, metrics: dict[str, Any], step: int, final: bool, val_due: bool, final_specs: list[PruneSpec]) -> None:
        """Rank 0: metrics to MLflow; at the end also the episode counts and the validation plots."""
        self.tracker.log(metrics, step)
        if final:
            self.tracker.log_figures(lambda client, run_id: client.log_dict(
                run_id, EpisodeCounts.from_metrics(metrics), "episode_counts.json"),
                "MLflow episode counts not logged (training result kept)")
        if final and val_due:
            at_budget = (metrics["val_macs_ratio"], metrics["val_accuracy"], final_specs)
            self.tracker.log_figures(lambda client, run_id: log_run_plots(
                client, run_id, self.pruner, self.val_tasks, self.cfg, at_budget))
        _print_progress(self.ctx, self.cfg, metrics)

    def _val_tasks(self) -> list[ValTask]:
        if self.val_tasks is None:
            self.val_tasks = build_val_tasks(self.cfg, self.setup)
        return self.val_tasks


# ------------------------------------------------------------------------------- setup pieces


def _restore_or_build(cfg: MetaTrainConfig, ctx: WorkerContext,
                      config_hash: str) -> tuple[StampPruner, dict[str, Any] | None, dict[str, Any] | None]:
    """(pruner on the device in train mode, saved state, optimizer state) from the run's checkpoint, else fresh."""
    state: dict[str, Any] | None = None
    opt_state: dict[str, Any] | None = None
    with ctx.checkpoint_dir() as ckpt:
        if ckpt is not None:
            pruner = StampPruner.load(ckpt)
            state = json.loads((ckpt / STATE_FILE).read_text())
            opt_state = load_weights(ckpt / OPTIMIZER_FILE, ctx.device)
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
    pruner.to(ctx.device)  # stamp_core moves the MACs cost model along
    pruner.train()
    return pruner, state, opt_state


def _optimizer(pruner: StampPruner, cfg: MetaTrainConfig, opt_state: dict[str, Any] | None) -> torch.optim.Optimizer:
    o = cfg.optim
    optimizer = make_optimizer(pruner, lr=o.lr, backbone_lr=o.backbone_lr, weight_decay=o.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
        for group, lr in zip(optimizer.param_groups, (o.lr, o.backbone_lr)):
            group["lr"] = lr  # the config wins over the saved rates (no schedule to restore)
    return optimizer


def _episode_stream_for(cfg: MetaTrainConfig, ctx: WorkerContext, setup: WorkerSetup, start_step: int,
                        data_seed: int) -> tuple[EpisodeSampler, Iterator[Any]]:
    """This rank's episode sampler and the episodes from ``start_step`` on (mid-epoch on a resume)."""
    steps_per_epoch, per_step = cfg.episodes.steps_per_epoch, cfg.episodes.per_step
    sampler = EpisodeSampler(
        setup.catalog_url,
        datasets=list(cfg.data.sources),
        weights=cfg.data.weights or None,
        weighting=cfg.data.weighting,
        image_size=cfg.data.image_size,
        ways=cfg.episodes.ways,
        support_per_class=cfg.episodes.support_per_class,
        max_support=cfg.episodes.max_support,
        query_size=cfg.episodes.query_size,
        macs_ratio_range=cfg.episodes.macs_ratio_range,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=data_seed,
        steps_per_epoch=steps_per_epoch * per_step,
        split=cfg.data.split,
        verify_sha256=cfg.data.verify_sha256,
        max_bad_fraction=cfg.data.max_bad_fraction,
        endpoint_url=setup.s3_endpoint,
        max_open_streams=cfg.data.max_open_streams,
    )
    sampler.set_epoch(start_step // steps_per_epoch)
    source: Any = sampler
    if cfg.data.loader_workers > 0:
        # Episodes are assembled in separate processes; persistent so their stream buffers survive epochs.
        source = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=cfg.data.loader_workers,
                                             persistent_workers=True, prefetch_factor=2,
                                             pin_memory=ctx.device.type == "cuda")
    in_epoch = start_step % steps_per_epoch
    return sampler, _episode_stream(source, (steps_per_epoch - in_epoch) * per_step if in_epoch else None)


def _report_done(ctx: WorkerContext, step: int, start_step: int) -> None:
    ctx.report({"step": step, "start_step": start_step, "already_done": 1}, None, "")


def _make_grad_hook(ctx: WorkerContext, clip: float) -> Callable[[StampPruner], None]:
    distributed = is_distributed(ctx)

    def hook(pruner: StampPruner) -> None:
        if distributed:
            allreduce_grads(pruner, ctx.world_size)
            average_buffers(pruner, ctx.world_size)
        # Clip here with the configured norm; meta_train_step's own clip at 5.0 is then a no-op
        # whenever clip <= 5.
        torch.nn.utils.clip_grad_norm_(pruner.parameters(), clip)

    return hook


def _print_progress(ctx: WorkerContext, cfg: MetaTrainConfig, m: dict[str, Any]) -> None:
    val = f" val_acc {m['val_accuracy']:.3f} @ MACs {m['val_macs_ratio']:.2f}" if "val_accuracy" in m else ""
    emit(
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


def prepare_meta_train(cfg: MetaTrainConfig) -> tuple[MetaTrainConfig, WorkerSetup, Any]:
    """Resolve settings and check the config against the catalog, before any cluster work.

    Returns a copy of the config with ``data.sources`` (and validation sources) as explicit lists,
    the worker setup, and the catalog.
    """
    cfg = cfg.model_copy(deep=True)
    endpoint = s3_endpoint()
    catalog_url = resolved_catalog_url(cfg.data)
    catalog = load_catalog(catalog_url, endpoint)
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
    if cfg.pretrained.startswith("models:/"):
        # Pin the alias to its version now: every worker (and a resumed run) loads the same weights.
        cfg.pretrained, _ = pin_model_uri(cfg.pretrained, resolved_tracking_uri(cfg.mlflow))
    elif cfg.pretrained != "none" and not cfg.pretrained.startswith("s3://") and not Path(cfg.pretrained).is_dir():
        raise ConfigError(f"pretrained: {cfg.pretrained} is not a directory")
    pin_locations(cfg, catalog_url)
    setup = WorkerSetup(catalog_url=catalog_url, s3_endpoint=endpoint,
                        tracking_uri=resolved_tracking_uri(cfg.mlflow) if cfg.mlflow.enabled else None)
    return cfg, setup, catalog


# =============================================================================== meta-train driver


def run_meta_train(cfg: MetaTrainConfig, *, name: str | None = None, callbacks: list[Any] | None = None,
                   mlflow_parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None,
                   on_report: ReportHandler | None = None) -> MetaTrainResult:
    """Meta-train a pruner with Ray Train; resumes when ``run_name`` already has a checkpoint.

    Args:
        cfg: the validated config.
        name: Ray run name override (Tune trials); default ``cfg.run_name``.
        callbacks: Ray Train ``UserCallback`` s (Tune passes ``TuneReportCallback``).
        mlflow_parent_run_id: nest the MLflow run under this one (a Tune job's run).
        extra_tags: more MLflow tags.
        on_report: called in this process, from another thread, with each report's metrics
            (``step``, ``loss``, ``episodes_per_s``, ``expected_macs_ratio``, ``val_accuracy`` ...).

    Raises:
        ConfigError: the config does not fit the catalog (checked before Ray starts anything).
        ray.train.TrainingFailedError: training failed more than ``max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg, setup, catalog = prepare_meta_train(cfg)
    # Before the MLflow run and any worker: a node-local path on a cluster is a config error.
    check_locations_reach_every_node(cfg, alive_ray_nodes())
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
    run_id = start_mlflow_run(cfg, "meta_train", name, (prior_state or {}).get("mlflow_run_id"), tags,
                              mlflow_parent_run_id)
    setup.mlflow_run_id = run_id
    path, fs = storage_filesystem(storage)
    with relay_reports(on_report) as relay:
        trainer = TorchTrainer(
            _meta_train_loop_ray,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "setup": asdict(setup)},
            scaling_config=scaling_config(cfg),
            torch_config=torch_config(cfg),
            run_config=RunConfig(
                name=name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                callbacks=[*(callbacks or []), *relay] or None,
            ),
        )
        result = fit(trainer, cfg, run_id, f"meta-training run {name}")
    state = read_checkpoint_state(result.checkpoint) or {}
    pruner_dir = checkpoint_to_local(result.checkpoint, local_root("meta_train", name))
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
