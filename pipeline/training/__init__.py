"""Training on Ray: reference pretraining, distributed STAMP meta-training, Ray Tune sweeps.

Every job is a per-worker loop in plain PyTorch (``*_worker``) behind a :class:`WorkerContext`
(Ray Train or one local process) and a driver (``run_*``) that validates the config against the
catalog before any cluster work, runs a ``TorchTrainer`` and closes its MLflow run.

Modules: ``context`` (where a loop runs), ``distributed`` (collectives), ``validation``
(meta-validation and run plots), ``meta_train``, ``pretrain``, ``tune`` (one job each), and two that
only the jobs share: ``driver`` (locations, scaling, fit) and ``tracking`` (MLflow runs and metrics).
"""

from pipeline.training.context import LocalContext, RayContext, WorkerContext, WorkerSetup
from pipeline.training.distributed import allreduce_grads, average_buffers, broadcast_state, is_distributed, mean_over_ranks
from pipeline.training.meta_train import (
    MetaTrainResult,
    build_pruner,
    meta_train_worker,
    prepare_meta_train,
    run_meta_train,
)
from pipeline.training.pretrain import PretrainResult, label_space, prepare_pretrain, pretrain_worker, run_pretrain
from pipeline.training.tune import (
    OBJECTIVE,
    TUNED_KEYS,
    TrialSummary,
    TuneResult,
    pick_best,
    register_best,
    run_tune,
    trial_config,
    trial_template,
)
from pipeline.training.validation import ValTask, build_val_tasks, log_run_plots, meta_validate

__all__ = [
    "LocalContext", "RayContext", "WorkerContext", "WorkerSetup",
    "allreduce_grads", "average_buffers", "broadcast_state", "is_distributed", "mean_over_ranks",
    "MetaTrainResult", "build_pruner", "meta_train_worker", "prepare_meta_train", "run_meta_train",
    "PretrainResult", "label_space", "prepare_pretrain", "pretrain_worker", "run_pretrain",
    "OBJECTIVE", "TUNED_KEYS", "TrialSummary", "TuneResult", "pick_best", "register_best", "run_tune", "trial_config",
    "trial_template",
    "ValTask", "build_val_tasks", "log_run_plots", "meta_validate",
]
