"""MLflow from the training jobs: the driver opens and closes the run, rank 0 logs metrics and plots.

A tracking outage never costs the trained pruner: rank 0 probes the server briefly before each
call (MLflow's own client retries an unreachable server for minutes), warns once and trains on;
closing the run at the end warns and says where the checkpoints are. MLflow and
:mod:`pipeline.registry` are imported where they are used: workers import this module too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import MetaTrainConfig, PretrainConfig, resolved_tracking_uri
from stamp_core import __version__ as stamp_version

log = logging.getLogger(__name__)


class Tracker:
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

    def log_figures(self, log_them: Callable[[Any, str], object],
                    what: str = "MLflow plots not logged (training result kept)") -> None:
        """Call ``log_them(client, run_id)`` to log figures; an MLflow outage or a plotting error only warns."""
        if self.client is None or not self._reachable(what):
            return
        try:
            log_them(self.client, str(self.run_id))
        except Exception as exc:  # noqa: BLE001 - plots must never cost the trained pruner
            self._warn(f"{what}: {exc}")

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


def start_mlflow_run(cfg: MetaTrainConfig | PretrainConfig, kind: str, name: str, prior_run_id: str | None,
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


def end_mlflow_run(cfg: MetaTrainConfig | PretrainConfig, run_id: str | None, ok: bool) -> None:
    """Mark the run FINISHED or FAILED; when MLflow is gone, warn and say where the checkpoints are."""
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
