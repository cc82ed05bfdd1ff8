"""Hyper-parameter search over STAMP meta-training with Ray Tune, and champion promotion.

Each Tune trial runs a *driver function* that builds its own ``TorchTrainer`` (the Ray 2.5x
pattern: the Tuner never receives a Trainer) with ``TuneReportCallback``, which forwards rank 0's
``ray.train.report`` metrics to Tune. The objective is meta-validation accuracy
(``val_accuracy``): held-out tasks from the sources' held-out split are pruned at a fixed MACs
budget with ``prune_for_task`` and fine-tuned briefly; its achieved ``val_macs_ratio`` is reported
with it. Every report of a trial carries a fresh validation (Tune requires the metric in every
result), so the trial's report interval is its validation interval, and ASHA (``time_attr="step"``)
stops the weak trials early.

After the search the best trial (highest final ``val_accuracy`` among trials that ran to the last
step) gives the pruner. With ``register: true`` it is logged to MLflow through
:mod:`pipeline.registry` and the ``champion`` alias moves to it only if its ``val_accuracy`` beats
the current champion's (``promote_if_better``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import MetaTrainConfig, TuneConfig, resolved_storage_path, resolved_tracking_uri
from pipeline.data import checkpoint_to_local, latest_run_checkpoint, storage_filesystem
from pipeline.training.driver import load_catalog, local_root, s3_endpoint
from pipeline.training.meta_train import prepare_meta_train, run_meta_train

log = logging.getLogger(__name__)

OBJECTIVE = "val_accuracy"
#: Search-space keys: OptimSection fields a trial may override.
TUNED_KEYS = ("kl_weight", "macs_weight", "lr", "backbone_lr", "es_sigma", "inner_lr")

#: ``on_result(trial_id, metrics, finished)``: a trial's report (``finished=False``) or its end
#: (``finished=True``, metrics empty); called in the driver process.
TrialHandler = Callable[[str, dict[str, Any], bool], None]


@dataclass
class TrialSummary:
    """One trial's outcome."""

    trial_id: str
    run_name: str  #: its Ray Train run (under ``<storage>/<tune name>/train_runs``)
    hyperparams: dict[str, float]
    val_accuracy: float | None
    val_macs_ratio: float | None
    step: int | None  #: last reported step (below meta_train.steps when ASHA stopped it)
    error: str | None = None


@dataclass
class TuneResult:
    """What a tuning job produced."""

    name: str
    best: TrialSummary
    pruner_dir: Path  #: local directory of the best trial's final pruner (StampPruner.load)
    metrics: dict[str, Any]  #: the best trial's last reported metrics
    trials: list[TrialSummary]
    mlflow_run_id: str | None = None
    registered_version: str | None = None
    champion_moved: bool | None = None
    grid: Any = field(default=None, repr=False)  #: the ray.tune.ResultGrid


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> MetaTrainConfig:
    """The trial's meta-train config: the template with the sampled optimiser values."""
    cfg = MetaTrainConfig.model_validate(base)
    for key in TUNED_KEYS:
        if key in sampled:
            setattr(cfg.optim, key, float(sampled[key]))
    return cfg


def _tune_trial(config: dict[str, Any], base: dict[str, Any], tune_name: str, parent_run_id: str | None) -> None:
    """Tune trial driver: one distributed meta-training run reporting through TuneReportCallback.

    ``config`` holds only the sampled values; the template travels via ``tune.with_parameters``
    (the object store) so it does not clutter trial names and result tables.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, config)
    trial_id = ray.tune.get_context().get_trial_id()
    run_meta_train(
        cfg,
        name=f"trial-{trial_id}",
        callbacks=[TuneReportCallback()],
        mlflow_parent_run_id=parent_run_id,
        extra_tags={"stamp.tune": tune_name, "stamp.trial_id": trial_id},
    )


def _driver_resources(cpus: float) -> dict[str, float]:
    """The trial driver's reservation; its TorchTrainer reserves the workers' resources itself.

    Tune refuses an all-zero request, so a driver that should hold no CPU reserves one byte of
    the ``memory`` resource instead: trials then run as concurrently as their workers fit.
    """
    return {"cpu": cpus} if cpus > 0 else {"cpu": 0, "memory": 1}


def _search_space(cfg: TuneConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key in TUNED_KEYS:
        rng = getattr(cfg.search, key)
        if rng is None:
            continue
        if rng.low == rng.high:
            space[key] = rng.low
        else:
            space[key] = tune.loguniform(rng.low, rng.high) if rng.log else tune.uniform(rng.low, rng.high)
    return space


def trial_template(cfg: TuneConfig, storage: str) -> MetaTrainConfig:
    """The resolved meta-train template: every report carries a validation, trials store under the tune job."""
    mt, _, _ = prepare_meta_train(cfg.meta_train)  # fail fast on the catalog before Ray starts anything
    interval = mt.validation.every or mt.checkpoint_every
    interval = min(interval, mt.steps)
    data = mt.model_dump(mode="json")
    data.update(report_every=interval, checkpoint_every=interval,
                storage_path=f"{storage.rstrip('/')}/{cfg.name}/train_runs")
    data["validation"]["every"] = interval
    # Trials share the starting pruner, so its step-0 validation would be the same work in each.
    data["validation"]["at_start"] = False
    return MetaTrainConfig.model_validate(data)


def _summaries(grid: Any) -> list[TrialSummary]:
    out = []
    for res in grid:
        m = res.metrics or {}
        trial_id = str(m.get("trial_id") or Path(str(res.path)).name)
        cfg = res.config or {}
        out.append(TrialSummary(
            trial_id=trial_id,
            run_name=f"trial-{trial_id}",
            hyperparams={k: float(cfg[k]) for k in TUNED_KEYS if k in cfg},
            val_accuracy=_float(m.get(OBJECTIVE)),
            val_macs_ratio=_float(m.get("val_macs_ratio")),
            step=int(m["step"]) if "step" in m else None,
            error=str(res.error) if res.error else None,
        ))
    return out


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def pick_best(trials: list[TrialSummary], max_step: int) -> TrialSummary:
    """Highest final val_accuracy, preferring trials that ran every step (ASHA-stopped ones were scored early)."""
    scored = [t for t in trials if t.val_accuracy is not None and t.error is None]
    if not scored:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported val_accuracy"
        raise RuntimeError(f"no tuning trial produced a result ({errors})")
    complete = [t for t in scored if t.step is not None and t.step >= max_step]
    pool = complete or scored
    return max(pool, key=lambda t: t.val_accuracy)  # type: ignore[arg-type,return-value]


def _parent_run(cfg: TuneConfig, mt: MetaTrainConfig) -> str | None:
    if not mt.mlflow.enabled:
        return None
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolved_tracking_uri(mt.mlflow))
    exp = client.get_experiment_by_name(mt.mlflow.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(mt.mlflow.experiment)
    run = client.create_run(exp_id, run_name=cfg.name, tags={"stamp.kind": "tune", "stamp.tune": cfg.name})
    params = [Param(k, v[:6000]) for k, v in cfg.flat_params().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def register_best(
    pruner_dir: Path,
    metrics: dict[str, Any],
    cfg: TuneConfig,
    *,
    hyperparams: dict[str, float] | None = None,
    run_id: str | None = None,
    lineage: dict[str, Any] | None = None,
    checkpoint_path: str | None = None,
) -> tuple[str | None, bool]:
    """Register the pruner in ``pruner_dir``; move ``cfg.champion_alias`` only if it beats the holder.

    Returns ``(version, champion_moved)``.

    Raises:
        RegistryError: MLflow unreachable or refusing; the message says where the pruner is kept
            (``checkpoint_path``, else ``pruner_dir``) and the command that registers it later.
    """
    tracking_uri = resolved_tracking_uri(cfg.meta_train.mlflow)
    objective = {k: float(metrics[k]) for k in (OBJECTIVE, "val_macs_ratio", "val_accuracy_before_finetune")
                 if _float(metrics.get(k)) is not None}
    if OBJECTIVE not in objective:
        raise RuntimeError(f"the best trial reported no {OBJECTIVE}; nothing to register")
    with _kept_on_registry_error(checkpoint_path or str(pruner_dir), cfg.model_name):
        return _register(pruner_dir, objective, cfg, hyperparams, run_id, lineage, tracking_uri)


@contextlib.contextmanager
def _kept_on_registry_error(where: str, model_name: str) -> Iterator[None]:
    """A registry failure at the end of a job: say where the trained pruner is and how to register it."""
    from pipeline.registry import RegistryError

    try:
        yield
    except RegistryError as exc:
        raise RegistryError(
            f"{str(exc).rstrip('.')}. The trained pruner was NOT registered; it is kept in {where}. Once MLflow is back, "
            f"register it with `stamp register --from-checkpoint {where} --name {model_name}`"
        ) from None


def _register(pruner_dir: Path, objective: dict[str, float], cfg: TuneConfig, hyperparams: dict[str, float] | None,
              run_id: str | None, lineage: dict[str, Any] | None, tracking_uri: str) -> tuple[str | None, bool]:
    from pipeline import registry
    from stamp_core import StampPruner

    registered = registry.log_pruner(
        StampPruner.load(pruner_dir),
        name=cfg.model_name,
        metrics=objective,
        params={f"best.{k}": v for k, v in (hyperparams or {}).items()},
        tags={"stamp.tune": cfg.name, "stamp.val_macs_ratio_target": cfg.meta_train.validation.macs_ratio},
        lineage=lineage,
        run_id=run_id,
        experiment=cfg.meta_train.mlflow.experiment,
        tracking_uri=tracking_uri,
    )
    moved = registry.promote_if_better(cfg.model_name, registered.version, OBJECTIVE,
                                       alias=cfg.champion_alias, tracking_uri=tracking_uri)
    return registered.version, moved


def _placement_group_ids() -> set[str]:
    from ray.util import placement_group_table

    return set(placement_group_table())


def _remove_placement_groups_since(before: set[str]) -> list[str]:
    """Remove placement groups created during the sweep that outlived it; returns their ids.

    In Ray 2.60 the Train worker group of a trial (each trial's driver function runs a
    TorchTrainer) can stay reserved after the trial ends: measured after a 2-trial sweep on a
    2-CPU in-process Ray, both trials' {CPU: 1} groups were still CREATED and every later 1-CPU
    task waited forever. Once ``fit()`` returns no trial of ours runs, so whatever this sweep
    created and left is a leak.
    """
    from ray._raylet import PlacementGroupID
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    leaked = [pg for pg, info in placement_group_table().items() if pg not in before and info.get("state") != "REMOVED"]
    for pg in leaked:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))
    if leaked:
        log.info("removed %d placement group(s) the sweep's trials left reserved", len(leaked))
    return leaked


def _trial_progress_callback(on_result: TrialHandler) -> Any:
    """A Ray Tune ``Callback`` (it runs in the driver process, in Tune's loop) for ``on_result``."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self, on_result: TrialHandler | None) -> None:
            self.on_result = on_result

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its RunConfig (callbacks included) into the experiment state; the
            # handler is this process's display (locks, a terminal) and stays behind.
            return {"on_result": None}

        def _call(self, trial: Any, metrics: dict[str, Any], finished: bool) -> None:
            if self.on_result is not None:
                _call_safely(self.on_result, trial.trial_id, metrics, finished)

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
            self._call(trial, dict(result), False)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._call(trial, {}, True)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._call(trial, {}, True)

    return TrialProgress(on_result)


def _call_safely(on_result: TrialHandler, trial_id: str, metrics: dict[str, Any], finished: bool) -> None:
    try:
        on_result(trial_id, metrics, finished)
    except Exception as exc:  # noqa: BLE001 - a broken display must not stop the sweep
        log.warning("progress display failed (tuning continues): %s", exc)


def run_tune(cfg: TuneConfig, *, on_result: TrialHandler | None = None) -> TuneResult:
    """Tune kl_weight / macs_weight / lr / backbone_lr with ASHA; optionally register the best pruner.

    ``on_result(trial_id, metrics, finished)`` is called in this process with each trial's
    reports (``step``, ``val_accuracy`` ...) and once when the trial ends (ASHA may stop it early).

    Raises:
        ConfigError: the template does not fit the catalog (checked before Ray starts).
        RuntimeError: no trial produced a validation result.
    """
    import ray.tune  # noqa: F401 - without Ray, fail before the MLflow parent run is created

    storage = resolved_storage_path(cfg.storage_path or cfg.meta_train.storage_path)
    mt = trial_template(cfg, storage)
    parent_run_id = _parent_run(cfg, mt)
    tuner = _tuner(cfg, mt, storage, parent_run_id, on_result)
    grid, trials, best = _fit(tuner, mt, parent_run_id)
    found = latest_run_checkpoint(mt.storage_path or storage, best.run_name)
    if found is None:
        raise RuntimeError(f"best trial {best.trial_id} left no checkpoint under {mt.storage_path}/{best.run_name}")
    checkpoint, _ = found
    pruner_dir = checkpoint_to_local(checkpoint, local_root("tune", f"{cfg.name}-{best.run_name}"))
    best_metrics = next((dict(r.metrics or {}) for r in grid
                         if str((r.metrics or {}).get("trial_id")) == best.trial_id), {})
    result = TuneResult(name=cfg.name, best=best, pruner_dir=pruner_dir, metrics=best_metrics, trials=trials,
                        mlflow_run_id=parent_run_id, grid=grid)
    checkpoint_at = f"{str(mt.storage_path or storage).rstrip('/')}/{best.run_name}"
    if parent_run_id is not None:
        _summarize_parent_run(cfg, mt, parent_run_id, best, best_metrics, checkpoint_at)
    if cfg.register:
        result.registered_version, result.champion_moved = _register_result(cfg, mt, result, checkpoint_at)
    elif parent_run_id is not None:
        _terminate(mt, parent_run_id, "FINISHED")
    return result


def _tuner(cfg: TuneConfig, mt: MetaTrainConfig, storage: str, parent_run_id: str | None,
           on_result: TrialHandler | None) -> Any:
    """The ``ray.tune.Tuner`` of the sweep: seeded random search under ASHA, one driver function per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    path, fs = storage_filesystem(storage)
    param_space = _search_space(cfg)
    trainable = tune.with_parameters(_tune_trial, base=mt.model_dump(mode="json"), tune_name=cfg.name,
                                     parent_run_id=parent_run_id)
    scheduler = ASHAScheduler(time_attr="step", max_t=mt.steps, grace_period=cfg.scheduler.grace_period,
                              reduction_factor=cfg.scheduler.reduction_factor)
    return tune.Tuner(
        tune.with_resources(trainable, _driver_resources(cfg.trial_driver_cpus)),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            num_samples=cfg.num_samples,
            scheduler=scheduler,
            # Seeded random search; it limits concurrency itself (TuneConfig's limit needs a Searcher).
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials),
        ),
        run_config=tune.RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                                  callbacks=[_trial_progress_callback(on_result)] if on_result else None),
    )


def _fit(tuner: Any, mt: MetaTrainConfig, parent_run_id: str | None) -> tuple[Any, list[TrialSummary], TrialSummary]:
    """Run the sweep and pick the best trial; any failure marks the parent run FAILED."""
    pgs_before = _placement_group_ids()
    try:
        try:
            grid = tuner.fit()
        finally:
            _remove_placement_groups_since(pgs_before)
        trials = _summaries(grid)
        best = pick_best(trials, mt.steps)
    except BaseException:
        if parent_run_id is not None:
            _terminate(mt, parent_run_id, "FAILED")
        raise
    return grid, trials, best


def _terminate(mt: MetaTrainConfig, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(resolved_tracking_uri(mt.mlflow)).set_terminated(run_id, status)


def _summarize_parent_run(cfg: TuneConfig, mt: MetaTrainConfig, run_id: str, best: TrialSummary,
                          metrics: dict[str, Any], checkpoint_at: str) -> None:
    """The best trial's metrics and hyper-parameters on the parent run, once MLflow is known to answer."""
    from pipeline.registry import check_tracking_uri

    with _kept_on_registry_error(checkpoint_at, cfg.model_name):
        check_tracking_uri(resolved_tracking_uri(mt.mlflow))  # MLflow's retries would hold the job for minutes
    _log_parent_summary(mt, run_id, best, metrics)


def _register_result(cfg: TuneConfig, mt: MetaTrainConfig, result: TuneResult, checkpoint_at: str) -> tuple[str | None, bool]:
    """Register the best trial's pruner with its lineage; returns ``(version, champion_moved)``."""
    best = result.best
    catalog = load_catalog(str(mt.data.catalog_url), s3_endpoint())  # pinned by the template
    return register_best(
        result.pruner_dir, result.metrics, cfg, hyperparams=best.hyperparams, run_id=result.mlflow_run_id,
        lineage={"catalog_hash": catalog.content_hash(), "source_datasets": list(mt.data.sources),
                 "config": mt.model_dump(mode="json"), "tune_name": cfg.name, "trial_id": best.trial_id},
        checkpoint_path=checkpoint_at,
    )


def _log_parent_summary(mt: MetaTrainConfig, run_id: str, best: TrialSummary, metrics: dict[str, Any]) -> None:
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolved_tracking_uri(mt.mlflow))
    values = [Metric(f"best_{k}", float(v), 0, 0) for k, v in metrics.items()
              if k.startswith("val_") and _float(v) is not None]
    client.log_batch(run_id, metrics=values, tags=[RunTag("stamp.best_trial", best.trial_id)]
                     + [RunTag(f"stamp.best.{k}", repr(v)) for k, v in best.hyperparams.items()])
