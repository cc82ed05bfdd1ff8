"""Typed job configurations (pretrain, meta-train, tune, benchmark) loaded from YAML plus ``key=value`` overrides.

Every job validates its whole configuration before it touches S3, MLflow or Ray, so a typo costs a
second, not a cluster start. Models are pydantic v2 with ``extra="forbid"``: an unknown key is an
error, never silently ignored. :func:`load_config` raises :class:`ConfigError` whose message names
each bad key as a dotted path (``optim.lr: Input should be greater than 0``).

Defaults that depend on where the job runs (catalog URL, storage path, MLflow URI) stay ``None`` in
the file and are resolved from :func:`pipeline.settings.get_settings` when the job starts
(``resolved_*`` helpers), so one YAML works on a laptop stack and on a cluster.

Credentials are never configuration: S3 keys come from the standard AWS variables, MLflow
credentials from ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``. A URI with an embedded password is
rejected so it cannot end up in MLflow params or logs.

Modules: ``base`` (the strict base model, checks, shared sections, resolution), ``loading`` (YAML,
overrides, validation), one per job (``pretrain``, ``meta_train``, ``tune``, ``benchmark``, ``outcomes``, ``fit_pruner``).
``pipeline.config.load_config`` is a stable name: tools outside the repository import it.
"""

from pipeline.config.base import (
    ConfigError,
    DataConfig,
    JobBase,
    MlflowSection,
    ScalingSection,
    resolved_catalog_url,
    resolved_storage_path,
    resolved_tracking_uri,
    section_from_dataclass,
)
from pipeline.config.benchmark import (
    BENCHMARK_METHODS,
    BenchAblationSection,
    BenchBBDSection,
    BenchFinetuneSection,
    BenchLatencySection,
    BenchmarkConfig,
    BenchmarkModel,
    BenchmarkTarget,
)
from pipeline.config.fit_pruner import FitMlflowSection, FitPrunerConfig
from pipeline.config.loading import (
    JobConfig,
    apply_overrides,
    format_validation_error,
    load_config,
    parse_override,
    validate_config,
)
from pipeline.config.meta_train import (
    EpisodeSection,
    FaultInjection,
    MetaTrainConfig,
    OptimSection,
    PrunerSection,
    ValidationSection,
)
from pipeline.config.outcomes import DEFAULT_CANDIDATES, OutcomeFinetuneSection, OutcomesConfig, OutcomeTasksSection
from pipeline.config.pretrain import PretrainConfig
from pipeline.config.tune import AshaSection, SearchRange, SearchSpace, TuneConfig

__all__ = [
    "ConfigError", "DataConfig", "JobBase", "MlflowSection", "ScalingSection", "resolved_catalog_url",
    "resolved_storage_path", "resolved_tracking_uri", "section_from_dataclass",
    "BENCHMARK_METHODS", "BenchAblationSection", "BenchBBDSection", "BenchFinetuneSection", "BenchLatencySection",
    "BenchmarkConfig", "BenchmarkModel", "BenchmarkTarget",
    "FitMlflowSection", "FitPrunerConfig",
    "JobConfig", "apply_overrides", "format_validation_error", "load_config", "parse_override", "validate_config",
    "EpisodeSection", "FaultInjection", "MetaTrainConfig", "OptimSection", "PrunerSection", "ValidationSection",
    "DEFAULT_CANDIDATES", "OutcomeFinetuneSection", "OutcomesConfig", "OutcomeTasksSection",
    "PretrainConfig",
    "AshaSection", "SearchRange", "SearchSpace", "TuneConfig",
]
