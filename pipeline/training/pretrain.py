"""Reference pretraining of the backbone: supervised, on the union of the source datasets (Ray Train, DDP).

Every rank reads its own shards of every source into memory (the sources are small); labels
follow each other in one joint label space (:func:`label_space`). Checkpoints hold the backbone
(``backbone.json`` + ``backbone_state_dict.pt``, usable as a ``pretrained:`` source), the
optimizer and ``state.json``; re-running with the same ``run_name`` continues from the last epoch.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import ConfigError, PretrainConfig, resolved_catalog_url, resolved_storage_path, resolved_tracking_uri
from pipeline.data import (
    CHECKPOINT_PREFIX,
    OPTIMIZER_FILE,
    STATE_FILE,
    checkpoint_to_local,
    iter_samples,
    latest_run_checkpoint,
    load_backbone_dir,
    load_split_arrays,
    read_checkpoint_state,
    save_backbone,
    storage_filesystem,
    write_json_atomic,
)
from pipeline.training.context import RayContext, WorkerContext, WorkerSetup, emit, set_threads
from pipeline.training.distributed import broadcast_state, is_distributed, mean_over_ranks
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
from stamp_core import Backbone, build_backbone, evaluate_accuracy, prepare_images, random_crop_flip
from stamp_core.pruner import load_weights


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


def has_converged(history: list[float], window: int, min_gain: float) -> bool:
    """True when the best of the last ``window`` scores beats the best before them by less than ``min_gain``."""
    if len(history) <= window:
        return False
    return max(history[-window:]) - max(history[:-window]) < min_gain


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
    set_threads(cfg.scaling.cpus_per_worker, device)
    data = _read_rank_share(cfg, setup, labels, ctx.rank, ctx.world_size)
    steps_per_epoch = max(1, _fewest_samples(len(data), ctx, device) // cfg.batch_size)
    # history: test top-1 after each epoch; the early-stopping rule reads it
    model, opt_state, start_epoch, history = _restore_or_build(cfg, ctx, labels)
    model.to(device)
    optimizer = _optimizer(model, cfg, opt_state)
    net = _distributed(model, ctx, device)
    eval_sets = _eval_sets(cfg, ctx, setup, labels)
    tracker = Tracker(setup.tracking_uri, setup.mlflow_run_id, cfg.mlflow.enabled and ctx.rank == 0)
    last: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        metrics = _train_epoch(net, optimizer, data, cfg, ctx, epoch, steps_per_epoch)
        with tempfile.TemporaryDirectory(prefix="stamp-ckpt-", ignore_cleanup_errors=True) as tmp:
            ckpt_dir = None
            if ctx.rank == 0:
                _evaluate(metrics, model, eval_sets, history, cfg, device)
                ckpt_dir = _save_checkpoint(Path(tmp) / "ckpt", model, optimizer, cfg, setup, labels, history,
                                            epoch, steps_per_epoch)
                tracker.log(metrics, epoch + 1)
                _print_epoch(ctx, cfg, metrics, epoch)
            ctx.report(metrics, ckpt_dir, f"{CHECKPOINT_PREFIX}{epoch + 1:08d}")
        last = metrics
        if _stop_on_every_rank(bool(metrics.get("converged", 0)), ctx, device):
            emit(ctx, f"[stamp pretrain {cfg.run_name}] converged after epoch {epoch + 1}: the best test top-1 of "
                      f"the last {cfg.early_stop_epochs} epochs gained less than {cfg.early_stop_min_gain:.3f}")
            break
    return last


def _fewest_samples(n_local: int, ctx: WorkerContext, device: torch.device) -> int:
    """The smallest rank's sample count: every rank must take the same number of steps (DDP would hang otherwise)."""
    if not is_distributed(ctx):
        return n_local
    t = torch.tensor([n_local], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _restore_or_build(cfg: PretrainConfig, ctx: WorkerContext, labels: list[dict[str, Any]],
                      ) -> tuple[Backbone, dict[str, Any] | None, int, list[float]]:
    """Model, optimizer state, first epoch and test top-1 history from the last checkpoint, else a fresh seeded model."""
    with ctx.checkpoint_dir() as ckpt:
        if ckpt is None:
            torch.manual_seed(cfg.seed)
            num_classes = sum(s["num_classes"] for s in labels)
            return build_backbone(cfg.backbone, num_classes, **cfg.backbone_kwargs), None, 0, []
        model = load_backbone_dir(ckpt)
        state = json.loads((ckpt / STATE_FILE).read_text())
        opt_state = load_weights(ckpt / OPTIMIZER_FILE, ctx.device)
        history = [float(a) for a in state.get("test_accuracy_history", [])]
        return model, opt_state, int(state["epoch"]), history


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig, opt_state: dict[str, Any] | None) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return optimizer


def _distributed(model: torch.nn.Module, ctx: WorkerContext, device: torch.device) -> torch.nn.Module:
    """The module to train: ``model`` itself, or under DDP with every rank starting from rank 0's weights."""
    if not is_distributed(ctx):
        return model
    broadcast_state(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _eval_sets(cfg: PretrainConfig, ctx: WorkerContext, setup: WorkerSetup,
               labels: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0's seeded sample of each source's test split (joint labels); empty on the other ranks."""
    eval_sets: list[tuple[torch.Tensor, torch.Tensor]] = []
    if ctx.rank != 0 or cfg.eval_samples <= 0:
        return eval_sets
    for spec in labels:
        try:
            x, y = load_split_arrays(setup.catalog_url, spec["dataset"], "test", endpoint_url=setup.s3_endpoint)
        except KeyError:
            continue  # no test split: train accuracy only
        keep = np.random.default_rng(cfg.seed).permutation(len(y))[: cfg.eval_samples]
        if len(keep):
            eval_sets.append((prepare_images(x[keep], cfg.data.image_size), torch.as_tensor(y[keep] + spec["offset"])))
    return eval_sets


def _train_epoch(net: torch.nn.Module, optimizer: torch.optim.Optimizer, data: _JointData, cfg: PretrainConfig,
                 ctx: WorkerContext, epoch: int, steps_per_epoch: int) -> dict[str, Any]:
    """One epoch of this rank's share; the epoch's metrics averaged over ranks."""
    device = ctx.device
    total_steps = steps_per_epoch * cfg.epochs
    net.train()
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, epoch, ctx.rank])
    order = rng.permutation(len(data))[: steps_per_epoch * cfg.batch_size]
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 131 + ctx.rank)
    loss_sum = correct = seen = 0.0
    for i in range(steps_per_epoch):
        step = epoch * steps_per_epoch + i
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(step, total_steps, cfg.lr)
        xb, yb = data.batch(np.sort(order[i * cfg.batch_size:(i + 1) * cfg.batch_size]), cfg.data.image_size)
        if cfg.augment:
            xb = random_crop_flip(xb, cfg.crop_padding, cfg.hflip, gen)
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
    agg = mean_over_ranks(local, ctx, device, sums=("_samples",), maxes=("_wall",))
    return {"epoch": epoch + 1, "loss": agg["loss"], "train_accuracy": agg["train_accuracy"],
            "samples_per_s": agg["_samples"] / agg["_wall"], "lr": float(optimizer.param_groups[0]["lr"])}


def _evaluate(metrics: dict[str, Any], model: torch.nn.Module, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
              history: list[float], cfg: PretrainConfig, device: torch.device) -> None:
    """Rank 0: add the mean test top-1 and the early-stopping verdict to ``metrics`` (and the top-1 to ``history``)."""
    if not eval_sets:
        return
    accs = [evaluate_accuracy(model, x.to(device), y.to(device)) for x, y in eval_sets]
    metrics["test_accuracy"] = float(np.mean(accs))
    history.append(metrics["test_accuracy"])
    late_enough = len(history) > cfg.early_stop_from * cfg.epochs
    stop = (cfg.early_stop_epochs is not None and late_enough
            and has_converged(history, cfg.early_stop_epochs, cfg.early_stop_min_gain))
    metrics["converged"] = int(stop)


def _save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: PretrainConfig,
                     setup: WorkerSetup, labels: list[dict[str, Any]], history: list[float], epoch: int,
                     steps_per_epoch: int) -> Path:
    """Write the backbone, the optimizer and ``state.json`` of the finished ``epoch`` to ``ckpt_dir``."""
    save_backbone(ckpt_dir, model, {"image_size": cfg.data.image_size, "labels": labels,
                                    "epoch": epoch + 1, "run_name": cfg.run_name})
    torch.save(optimizer.state_dict(), ckpt_dir / OPTIMIZER_FILE)
    write_json_atomic(ckpt_dir / STATE_FILE, {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                                              "config_hash": cfg.config_hash(exclude=("run_name", "epochs")),
                                              "test_accuracy_history": history,
                                              "mlflow_run_id": setup.mlflow_run_id, "run_name": cfg.run_name})
    return ckpt_dir


def _print_epoch(ctx: WorkerContext, cfg: PretrainConfig, metrics: dict[str, Any], epoch: int) -> None:
    acc = f" test_acc {metrics['test_accuracy']:.3f}" if "test_accuracy" in metrics else ""
    emit(ctx, f"[stamp pretrain {cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} loss {metrics['loss']:.4f} "
              f"train_acc {metrics['train_accuracy']:.3f}{acc} {metrics['samples_per_s']:.0f} img/s")


def _stop_on_every_rank(stop: bool, ctx: WorkerContext, device: torch.device) -> bool:
    """Rank 0 decides (it alone evaluates); every rank must leave the loop at the same epoch."""
    if not is_distributed(ctx):
        return stop
    flag = torch.tensor([int(stop and ctx.rank == 0)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _pretrain_loop_ray(config: dict[str, Any]) -> dict[str, Any]:
    cfg = PretrainConfig.model_validate(config["cfg"])
    return pretrain_worker(cfg, RayContext(), WorkerSetup(**config["setup"]), config["labels"])


def prepare_pretrain(cfg: PretrainConfig) -> tuple[PretrainConfig, WorkerSetup, list[dict[str, Any]], Any]:
    """Resolve settings and the joint label space, before any cluster work."""
    cfg = cfg.model_copy(deep=True)
    endpoint = s3_endpoint()
    catalog_url = resolved_catalog_url(cfg.data)
    catalog = load_catalog(catalog_url, endpoint)
    cfg.data.sources = resolve_sources(cfg.data.sources, catalog)
    for n in cfg.data.sources:
        if cfg.data.split not in catalog.get(n).splits:
            raise ConfigError(f"data.split: dataset {n!r} has no split {cfg.data.split!r}")
    pin_locations(cfg, catalog_url)
    setup = WorkerSetup(catalog_url=catalog_url, s3_endpoint=endpoint,
                        tracking_uri=resolved_tracking_uri(cfg.mlflow) if cfg.mlflow.enabled else None)
    return cfg, setup, label_space(catalog, list(cfg.data.sources)), catalog


def run_pretrain(cfg: PretrainConfig, *, on_report: ReportHandler | None = None) -> PretrainResult:
    """Supervised reference pretraining of ``cfg.backbone`` on the union of the sources (Ray Train, DDP).

    Re-running with the same ``run_name`` and ``storage_path`` continues from the last epoch.
    ``on_report`` is called in this process with each epoch's metrics (``epoch``, ``loss``,
    ``train_accuracy``, ``samples_per_s``, ``test_accuracy``), from another thread.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg, setup, labels, catalog = prepare_pretrain(cfg)
    check_locations_reach_every_node(cfg, alive_ray_nodes())
    storage = cfg.storage_path or resolved_storage_path(None)
    prior = latest_run_checkpoint(storage, cfg.run_name)
    run_id = start_mlflow_run(cfg, "pretrain", cfg.run_name, (prior[1] if prior else {}).get("mlflow_run_id"),
                              {"stamp.catalog_hash": catalog.content_hash(), "stamp.storage_path": storage})
    setup.mlflow_run_id = run_id
    path, fs = storage_filesystem(storage)
    with relay_reports(on_report) as relay:
        trainer = TorchTrainer(
            _pretrain_loop_ray,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "setup": asdict(setup), "labels": labels},
            scaling_config=scaling_config(cfg),
            torch_config=torch_config(cfg),
            run_config=RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 callbacks=relay or None),
        )
        result = fit(trainer, cfg, run_id, f"pretraining run {cfg.run_name}")
    state = read_checkpoint_state(result.checkpoint) or {}
    return PretrainResult(
        name=cfg.run_name,
        path=str(result.path),
        epoch=int(state.get("epoch", 0)),
        metrics=dict(result.metrics or {}),
        checkpoint=result.checkpoint,
        backbone_dir=checkpoint_to_local(result.checkpoint, local_root("pretrain", cfg.run_name)),
        mlflow_run_id=run_id,
        result=result,
    )
