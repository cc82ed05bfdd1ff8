"""What the drivers of the training jobs share, before and after ``TorchTrainer.fit``.

Before any cluster work: resolve the catalog, the sources and the storage / tracking locations,
and pin them into the config the workers receive. Around the fit: the ``ScalingConfig``, closing
the MLflow run whatever happens, and a local directory for the run's result. During the fit,
:func:`relay_reports` hands every ``ray.train.report`` to a callable in the driver process (the
CLI's progress line).
"""

from __future__ import annotations

import fnmatch

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.data import absolute_location
from pipeline.config import ConfigError, MetaTrainConfig, PretrainConfig, resolved_storage_path, resolved_tracking_uri
from pipeline.training.tracking import end_mlflow_run

log = logging.getLogger(__name__)

#: What the driver is handed after each report: rank 0's metrics (already averaged over ranks).
ReportHandler = Callable[[dict[str, Any]], None]


def resolve_sources(cfg_sources: Any, catalog: Any) -> list[str]:
    """``"all"`` -> every catalogued dataset; a list is checked against the catalog, where an entry with
    shell wildcards (``tin-*``) stands for every catalogued name it matches (one suite of a shared catalog)."""
    if cfg_sources == "all":
        names = catalog.names()
    else:
        names = []
        for entry in cfg_sources:
            if not any(ch in entry for ch in "*?["):
                names.append(entry)
                continue
            matched = sorted(fnmatch.filter(catalog.names(), entry))
            if not matched:
                raise ConfigError(f"data.sources: pattern {entry!r} matches no dataset of the catalog; "
                                  "ingest its suite with `stamp ingest --suite`")
            names.extend(matched)
        names = list(dict.fromkeys(names))  # a dataset matched twice is drawn as often as any other
    if not names:
        raise ConfigError("data.sources: the catalog has no datasets; ingest some with `stamp ingest`")
    missing = [n for n in names if n not in catalog]
    if missing:
        known = ", ".join(catalog.names()) or "none"
        raise ConfigError(f"data.sources: {missing} not in the catalog (known: {known}); ingest with `stamp ingest`")
    return names


def load_catalog(catalog_url: str, endpoint: str | None) -> Any:
    """The catalog at ``catalog_url``; a missing one is a ConfigError that says to ingest first."""
    from pipeline.data import Catalog, s3

    try:
        return Catalog.load(catalog_url, missing_ok=False, endpoint_url=endpoint)
    except s3.ObjectNotFoundError:
        raise ConfigError(
            f"data.catalog_url: no catalog at {catalog_url}; ingest datasets first (`stamp ingest`) "
            "or point data.catalog_url at an existing catalog.json"
        ) from None


def s3_endpoint() -> str | None:
    """The S3 endpoint from the settings (None for AWS itself)."""
    from pipeline.settings import get_settings

    return get_settings().s3_endpoint


def pin_locations(cfg: MetaTrainConfig | PretrainConfig, catalog_url: str) -> None:
    """Write the resolved catalog, storage, pretrained-weights and tracking locations into the config.

    Processes Ray starts later (Tune trial drivers, workers) may see another environment than
    this driver; the config they receive must not be resolved again. A tracking URI with
    embedded credentials is left unpinned (configs never carry secrets).
    """
    cfg.data.catalog_url = catalog_url
    cfg.storage_path = resolved_storage_path(cfg.storage_path)
    pretrained = getattr(cfg, "pretrained", "none")  # meta-training only: the backbone to start from
    if pretrained != "none" and not pretrained.startswith("models:/"):
        cfg.pretrained = absolute_location(pretrained)
    if cfg.mlflow.enabled:
        uri = resolved_tracking_uri(cfg.mlflow)
        # One short probe: MLflow's client would otherwise retry an unreachable server for minutes.
        from pipeline.registry import check_tracking_uri
        from pipeline.settings import get_settings

        get_settings().state_dir.mkdir(parents=True, exist_ok=True)  # home of the default sqlite store
        check_tracking_uri(uri)
        if not cfg.mlflow.tracking_uri and ("://" not in uri or not urlsplit(uri).password):
            cfg.mlflow.tracking_uri = uri


def fit(trainer: Any, cfg: MetaTrainConfig | PretrainConfig, run_id: str | None, what: str) -> Any:
    """``trainer.fit()``; close the MLflow run either way; the result must hold a checkpoint."""
    ok = False
    try:
        result = trainer.fit()
        ok = result.error is None
    finally:
        end_mlflow_run(cfg, run_id, ok)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what} finished without a checkpoint")
    return result


def scaling_config(cfg: MetaTrainConfig | PretrainConfig) -> Any:
    """Ray's ``ScalingConfig`` for ``cfg.scaling`` (one GPU per worker when ``use_gpu``)."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                         resources_per_worker=resources, placement_strategy=cfg.scaling.placement_strategy)


def torch_config(cfg: MetaTrainConfig | PretrainConfig) -> Any:
    """Ray's ``TorchConfig``: NCCL between GPU workers, gloo between CPU workers (on loopback, on a loopback node)."""
    from pipeline.training.rendezvous import LoopbackTorchConfig

    return LoopbackTorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo")


def node_local_locations(cfg: MetaTrainConfig | PretrainConfig) -> dict[str, str]:
    """The config's locations (after :func:`pin_locations`) that only the driver's machine can reach.

    Keys are config keys; values the local path (or the local MLflow store) they hold.
    """
    found: dict[str, str] = {}
    if cfg.storage_path and not cfg.storage_path.startswith("s3://"):
        found["storage_path"] = cfg.storage_path
    if cfg.data.catalog_url and "://" not in cfg.data.catalog_url:
        found["data.catalog_url"] = cfg.data.catalog_url
    pretrained = getattr(cfg, "pretrained", "none")
    if pretrained != "none" and not pretrained.startswith(("s3://", "models:/")):  # models:/ goes with the tracking URI
        found["pretrained"] = pretrained
    uri = cfg.mlflow.tracking_uri
    if cfg.mlflow.enabled and uri and urlsplit(uri).scheme not in ("http", "https", "databricks"):
        found["mlflow.tracking_uri"] = uri
    return found


def check_locations_reach_every_node(cfg: MetaTrainConfig | PretrainConfig, nodes: int) -> None:
    """Refuse node-local paths when the run spans (or may span) several Ray nodes.

    On one node a local directory is shared by every worker; on a cluster each node has its own
    disk, so a checkpoint written there is invisible to the node that replaces a lost one and a
    catalog there is missing on the other nodes. ``nodes`` is the number of alive Ray nodes;
    ``STRICT_SPREAD`` with more than one worker counts as several nodes whatever the cluster has now.
    """
    spread = cfg.scaling.placement_strategy == "STRICT_SPREAD" and cfg.scaling.num_workers > 1
    if nodes <= 1 and not spread:
        return
    local = node_local_locations(cfg)
    if not local:
        return
    where = f"this Ray cluster has {nodes} nodes" if nodes > 1 else "scaling.placement_strategy=STRICT_SPREAD"
    items = "; ".join(f"{key}: {value}" for key, value in local.items())
    raise ConfigError(
        f"{', '.join(local)}: node-local location(s) on a multi-node run ({where}): {items}. Each node has "
        "its own disk, so workers on other nodes cannot read these and a node that replaces a lost one "
        "cannot find the checkpoints. Use URLs every node reaches: storage_path=s3://BUCKET/ray_results, "
        "data.catalog_url=s3://BUCKET/datasets/catalog.json, pretrained=s3://..., an http(s) MLflow server"
    )


def alive_ray_nodes() -> int:
    """Alive nodes of the Ray cluster this process is attached to (0 when Ray is not initialized)."""
    import ray

    if not ray.is_initialized():
        return 0
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def local_root(kind: str, name: str) -> Path:
    """``<state dir>/checkpoints/<kind>/<name>``, created: where a run's result is copied locally."""
    from pipeline.settings import get_settings

    root = get_settings().state_dir / "checkpoints" / kind / name
    root.mkdir(parents=True, exist_ok=True)
    return root


def _report_relay_callback(queue: Any) -> Any:
    """A Ray Train ``UserCallback`` putting rank 0's metrics of each report on ``queue``.

    Ray Train V2 calls user callbacks in its controller actor, not in the driver process, so the
    metrics travel through a ``ray.util.queue.Queue`` (a small actor) the driver reads.
    """
    from ray.train import UserCallback

    class ReportRelay(UserCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if not metrics:
                return
            try:
                self.queue.put_nowait(dict(metrics[0]))
            except Exception:  # noqa: BLE001 - progress must never stop training
                pass

    return ReportRelay(queue)


@contextmanager
def relay_reports(on_report: ReportHandler | None) -> Iterator[list[Any]]:
    """Yield Ray Train callbacks that hand each report's metrics to ``on_report`` in this process.

    Give the callbacks to the trainer's ``RunConfig`` and fit inside the block. A thread of the
    driver reads the queue and calls ``on_report`` (so it must be thread-safe); on exit the
    reports still queued are handed over too. ``on_report=None`` yields no callback and starts
    nothing. An error in ``on_report`` is logged once and never reaches training.
    """
    if on_report is None:
        yield []
        return
    from queue import Empty

    from ray.util.queue import Queue

    # num_cpus=0: the relay must not take a CPU the training workers were given.
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    failed: list[BaseException] = []

    def hand_over(item: dict[str, Any]) -> None:
        if failed:
            return
        try:
            on_report(item)
        except Exception as exc:  # noqa: BLE001 - a broken display must not cost the run
            failed.append(exc)
            log.warning("progress display failed (training continues): %s", exc)

    def pump() -> None:
        while not stop.is_set():
            try:
                hand_over(queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone (Ray shutting down)
                return

    thread = threading.Thread(target=pump, name="stamp-report-relay", daemon=True)
    thread.start()
    try:
        yield [_report_relay_callback(queue)]
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            for item in queue.get_nowait_batch(queue.qsize()):
                hand_over(item)
        except Exception:  # noqa: BLE001 - nothing left to show, or Ray is gone
            pass
        queue.shutdown()
