"""Typed job configurations (pretrain, meta-train, tune) loaded from YAML plus ``key=value`` overrides.

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
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAMED_MSG_RE = re.compile(r"^([a-z_][a-z0-9_.]*): ")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names every bad key."""


# ----------------------------------------------------------------------------------- helpers


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is invalid: use [A-Za-z0-9][A-Za-z0-9._-]* (at most 128 characters, no '..')"
        )
    return value


def _check_uri_has_no_password(value: str | None) -> str | None:
    """URIs travel into MLflow params and worker configs: refuse embedded secrets."""
    if value and "://" in value and urlsplit(value).password:
        raise ValueError(
            "the URI embeds a password; put credentials in the environment "
            "(AWS_* for S3, MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD for MLflow) instead"
        )
    return value


def _check_storage_path(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError("storage_path is empty: give a local directory or s3://bucket/prefix")
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme != "s3":
            raise ValueError(f"storage_path scheme {scheme!r} is not supported: use a local path or s3://bucket/prefix")
        if not value[5:].split("/", 1)[0]:
            raise ValueError(f"storage_path {value!r} has no bucket: use s3://bucket/prefix")
        _check_uri_has_no_password(value)
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def _check_backbone(name: str) -> str:
    from stamp_core.backbones import list_backbones  # light: torch only

    if name not in list_backbones():
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(list_backbones())}")
    return name


class _Strict(BaseModel):
    """Base: unknown keys are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


# ----------------------------------------------------------------------------------- sections


class DataConfig(_Strict):
    """Where the source datasets are and how they are read."""

    #: catalog.json URL (s3://... or a local path); None = the platform's catalog from settings.
    catalog_url: str | None = None
    #: catalog dataset names (or shell patterns such as ``tin-*``) to train on, or "all" for every dataset.
    sources: Union[Literal["all"], list[str]] = "all"
    #: relative sampling weight per source (missing ones weigh 1), applied on top of ``weighting``.
    weights: dict[str, float] = Field(default_factory=dict)
    #: how each episode's dataset is drawn: every dataset equally ("uniform"), by its number of images
    #: ("size"), or every suite base equally ("base": many variants of MNIST do not crowd out the rest).
    weighting: Literal["uniform", "size", "base"] = "uniform"
    #: split the job trains on.
    split: str = "train"
    #: side of the square inputs (>= 28: the deepest backbones pool five times).
    image_size: int = Field(32, ge=28, le=512)
    #: check each shard's sha256 against the catalog before use (costs one extra read).
    verify_sha256: bool = False
    #: fail when more than this share of samples is unusable.
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    #: DataLoader processes per training worker for episode assembly (0 = in the training loop).
    loader_workers: int = Field(0, ge=0, le=32)
    #: episodes assembled ahead by a background thread, overlapping the training step (0 = off).
    prefetch: int = Field(2, ge=0, le=64)
    #: dataset streams (each one open S3 connection) a reader process keeps open at once. Each worker
    #: reads only its share of the sources (about len(sources) / workers, the sampling weights kept
    #: exactly over the job); beyond this bound, drawing another dataset closes the least recently
    #: used stream, which later resumes where it stopped with one ranged GET.
    max_open_streams: int = Field(8, ge=1, le=1024)

    @field_validator("catalog_url")
    @classmethod
    def _catalog(cls, v: str | None) -> str | None:
        return _check_uri_has_no_password(v)

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v == "all":
                return v
            # "a,b" on the command line is friendlier than a YAML list.
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError("sources is empty: name at least one dataset, or use 'all'")
            for s in v:
                if not isinstance(s, str):
                    raise ValueError(f"source {s!r} is not a dataset name")
                # a shell pattern (tin-*) picks one suite out of a shared catalog: the characters around
                # the wildcards must still be those of dataset names
                _check_name(re.sub(r"[*?\[\]]", "x", s), "dataset name or pattern")
            if len(set(v)) != len(v):
                raise ValueError(f"sources lists a dataset twice: {list(v)}")
            return list(v)
        raise ValueError("expected 'all' or a list of catalog dataset names")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} is {w}: expected a finite number >= 0")
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        return _check_name(v, "split name")

    @model_validator(mode="after")
    def _weights_name_sources(self) -> "DataConfig":
        if self.sources != "all":
            unknown = sorted(set(self.weights) - set(self.sources))
            if unknown:
                raise ValueError(f"weights: names datasets that are not in sources: {unknown}")
        return self


class ScalingSection(_Strict):
    """How many Ray Train workers and what each one gets."""

    num_workers: int = Field(1, ge=1, le=1024)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    #: Ray placement of the workers: PACK fills a node first; STRICT_SPREAD puts every worker on
    #: its own node (a run then needs num_workers nodes, and a lost node is a lost worker).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class MlflowSection(_Strict):
    """Experiment tracking; the tracking URI defaults to settings (MLFLOW_TRACKING_URI / the stack)."""

    enabled: bool = True
    experiment: str = "stamp-meta-train"
    tracking_uri: str | None = None

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return _check_uri_has_no_password(v)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("experiment name is empty")
        return v


class EpisodeSection(_Strict):
    """Shape of a meta-training episode (see pipeline.data.EpisodeSampler)."""

    #: (min, max) classes per episode.
    ways: tuple[int, int] = (2, 10)
    #: encoder set images per class (before the max_support cap).
    support_per_class: int = Field(20, ge=1, le=10_000)
    #: cap on the encoder set.
    max_support: int = Field(400, ge=1, le=100_000)
    #: training (query) batch per episode.
    query_size: int = Field(64, ge=1, le=100_000)
    #: (r_min, r_max) of the MACs budget drawn per episode.
    macs_ratio_range: tuple[float, float] = (0.1, 1.0)
    #: optimiser steps per epoch on every rank (only numbers epochs for the samplers' random streams).
    steps_per_epoch: int = Field(100, ge=1)
    #: episodes per optimiser step on every rank (a meta-batch); pruner.task_norm="batch" needs >= 2.
    per_step: int = Field(2, ge=1, le=256)

    @field_validator("ways")
    @classmethod
    def _ways(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"ways must be [min, max] with 1 <= min <= max, got {list(v)}")
        return v

    @field_validator("macs_ratio_range")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"macs_ratio_range must be [r_min, r_max] with 0 < r_min <= r_max <= 1, got {list(v)}")
        return v


class OptimSection(_Strict):
    """Meta-training optimiser and loss weights (stamp_core.MetaConfig + make_optimizer)."""

    lr: float = Field(1e-3, gt=0, le=10)  #: encoder + generator learning rate
    backbone_lr: float = Field(1e-4, ge=0, le=10)  #: shared backbone learning rate (0 freezes it)
    weight_decay: float = Field(0.0, ge=0)
    kl_weight: float = Field(1e-4, ge=0)  #: gamma of the KL term
    macs_weight: float = Field(20.0, ge=0)  #: lambda of the budget penalty
    inner_steps: int = Field(0, ge=0, le=100)  #: first-order inner-loop SGD steps (0 = off)
    inner_lr: float = Field(0.01, gt=0)
    head_scale: float = Field(10.0, gt=0)
    label_free_prob: float = Field(0.0, ge=0, le=1)
    budget_penalty: Literal["two_sided", "upper"] = "two_sided"
    #: "relaxed" (v1): sampled soft masks + KL + budget penalty; "deployed" (v2): the calibrated
    #: hard mask, inner_steps of fine-tuning on the support set, CE on the query batch.
    objective: Literal["relaxed", "deployed"] = "relaxed"
    #: objective=deployed only: also penalise the keep probabilities' expected MACs (under evaluation)
    deployed_macs_penalty: bool = False
    #: objective=deployed only: "plain" straight-through gradient, or "budget_neutral" (each channel
    #: charged its marginal MACs so that a common shift of all keep probabilities gets no gradient)
    #: "layer_es": no straight-through gradient; antithetic ES on one logit shift per layer (how many
    #: channels each layer keeps), every perturbed mask calibrated and scored like the deployed one
    deployed_gradient: Literal["plain", "budget_neutral", "layer_es"] = "plain"
    es_pairs: int = Field(4, ge=1, le=64)  #: layer_es: antithetic pairs of per-layer shifts per episode
    es_sigma: float = Field(0.5, gt=0)  #: layer_es: standard deviation of a layer's logit shift
    #: "bf16": meta-training losses under bfloat16 autocast (GPUs with bf16; on CPU it is slower);
    #: weights, gradients and the optimizer stay float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    #: max global gradient norm (stamp_core's meta_train_step also clips at 5, hence the cap).
    grad_clip: float = Field(5.0, gt=0, le=5.0)


class PrunerSection(_Strict):
    """Architecture of the set encoder and mask generator (stamp_core.PrunerConfig)."""

    embed_dim: int = Field(128, ge=4)
    num_heads: int = Field(4, ge=1)
    num_inducing: int = Field(32, ge=1)
    hidden_dim: int = Field(256, ge=4)
    prior_alpha: float = Field(1e-4, gt=0)
    temperature: float = Field(0.1, gt=0)
    #: "l1": channel scores start at the pretrained weights' group L1 ranking (first mask = L1's);
    #: "none": equal base posteriors (v1).
    score_init: Literal["l1", "none"] = "l1"
    #: "batch": task embeddings standardised across each meta-batch (v2); "running": v1's
    #: running statistics of single tasks + LayerNorm.
    task_norm: Literal["batch", "running"] = "batch"
    #: "faithful": the paper's generator (set embedding -> per-layer heads); "channel": per-channel
    #: response statistics of the task's sample scored by one network shared across channels.
    generator: Literal["faithful", "channel"] = "faithful"

    @model_validator(mode="after")
    def _heads_divide(self) -> "PrunerSection":
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim: {self.embed_dim} must be a multiple of num_heads ({self.num_heads})")
        return self


class ValidationSection(_Strict):
    """Meta-validation: prune held-out source tasks at a fixed budget and fine-tune briefly.

    Tasks come from ``split`` (default ``test``) of the ``sources`` datasets: images meta-training
    never reads. Each task takes ``shots`` images per class to generate the mask and fine-tune
    on, and ``test_per_class`` others to score the pruned network.
    """

    #: validate every N steps (a multiple of report_every); 0 = only at the end of training.
    every: int = Field(0, ge=0)
    enabled: bool = True
    #: datasets to draw held-out tasks from; None = the training sources.
    sources: list[str] | None = None
    split: str = "test"
    tasks: int = Field(4, ge=1, le=1000)
    ways: int = Field(5, ge=2)
    shots: int = Field(10, ge=1)
    test_per_class: int = Field(10, ge=1)
    macs_ratio: float = Field(0.3, gt=0, le=1)
    finetune_epochs: int = Field(1, ge=0)
    finetune_lr: float = Field(0.05, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 1234
    #: budgets of the accuracy-vs-MACs curve validated once at the end and plotted to MLflow
    #: (``macs_ratio`` is always on it); empty = no curve.
    curve_ratios: list[float] = Field(default_factory=lambda: [0.1, 0.5])
    #: a registered cheap criterion (stamp_core.baselines) whose mask is scored on the same tasks,
    #: weights and fine-tune: logs ``val_accuracy_<name>`` and ``val_gain_vs_<name>`` (STAMP minus it),
    #: the number that says whether meta-training beats the criterion it started from. None = off.
    reference: str | None = "l1"
    #: also validate before the first step (step 0), the baseline of every curve.
    at_start: bool = True

    @field_validator("curve_ratios")
    @classmethod
    def _curve_ratios(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0 < r <= 1]
        if bad:
            raise ValueError(f"curve_ratios {bad} outside (0, 1]: each is a MACs ratio pruned / full")
        return sorted(set(v))

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from stamp_core.baselines import get_criterion

        if get_criterion(v).trains:  # raises ValueError naming the registered criteria on a miss
            raise ValueError(f"validation reference {v!r} trains on the task: expected a one-pass criterion such as l1")
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("validation sources is empty: name datasets or leave it null")
            for s in v:
                _check_name(s, "dataset name")
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        return _check_name(v, "split name")


class FaultInjection(_Strict):
    """Testing only: make ``rank`` exit abruptly after ``step``, once (the marker file records it)."""

    rank: int = Field(1, ge=0)
    step: int = Field(..., ge=1)
    #: created atomically before the exit; when it already exists nothing is injected.
    marker: str


class _JobBase(_Strict):
    """Fields every Ray job shares."""

    #: Ray run name: re-running with the same name and storage_path resumes from its checkpoint.
    run_name: str = "stamp"
    #: where Ray keeps checkpoints: a local directory or s3://bucket/prefix; None = STATE_DIR/ray_results.
    storage_path: str | None = None
    seed: int = 0
    backbone: str = "resnet20"
    #: backbone-specific options (small_cnn: width).
    backbone_kwargs: dict[str, int] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    #: worker-group restarts from the latest checkpoint before the job fails (-1 = unlimited).
    max_failures: int = Field(1, ge=-1)
    #: checkpoints kept in storage (oldest deleted first).
    keep_checkpoints: int = Field(2, ge=1)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        return _check_name(v, "run_name")

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        return _check_storage_path(v)

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        return _check_backbone(v)

    def config_hash(self, exclude: Iterable[str] = ()) -> str:
        """sha256 of the canonical JSON of the config without ``exclude`` (top-level keys)."""
        data = self.model_dump(mode="json", exclude=set(exclude))
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def flat_params(self) -> dict[str, str]:
        """The config as flat ``a.b -> str`` pairs for MLflow params (no secrets are ever in it)."""
        return _flatten(self.model_dump(mode="json"))


class PretrainConfig(_JobBase):
    """Supervised reference pretraining of the backbone on the union of the source datasets."""

    kind: Literal["pretrain"] = "pretrain"
    run_name: str = "stamp-pretrain"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    #: random crops (per image, ``crop_padding`` px of black padding) and, with ``hflip``, horizontal flips.
    augment: bool = True
    #: padding of the random crop in pixels: 4 is the usual recipe for 32-px natural images.
    crop_padding: int = Field(2, ge=0, le=16)
    #: random horizontal flips: right for natural images, wrong for digits and glyphs.
    hflip: bool = False
    #: use at most this many training images per dataset (None = all): quick runs on big sets.
    max_samples_per_dataset: int | None = Field(None, ge=1)
    #: test images per dataset scored after each epoch (rank 0); 0 = skip.
    eval_samples: int = Field(1000, ge=0)
    #: stop once the best test top-1 of the last ``early_stop_epochs`` epochs beats the best before them
    #: by less than ``early_stop_min_gain`` (None = always run ``epochs``; needs ``eval_samples > 0``).
    early_stop_epochs: int | None = Field(None, ge=1)
    #: accuracy gain (fraction, 0.005 = half a point) that counts as progress for ``early_stop_epochs``.
    early_stop_min_gain: float = Field(0.005, ge=0, lt=1)
    mlflow: MlflowSection = Field(default_factory=lambda: MlflowSection(experiment="stamp-pretrain"))

    @model_validator(mode="after")
    def _early_stop_needs_eval(self) -> "PretrainConfig":
        if self.early_stop_epochs is not None and self.eval_samples == 0:
            raise ValueError("early_stop_epochs needs eval_samples > 0: the stopping rule reads the test accuracy")
        return self


class MetaTrainConfig(_JobBase):
    """Distributed STAMP meta-training (encoder + mask generator + shared backbone)."""

    kind: Literal["meta_train"] = "meta_train"
    run_name: str = "stamp-meta"
    #: starting backbone: a registered backbone (models:/stamp-backbone-NAME@champion), a pretrain
    #: checkpoint or pruner directory (local or s3://), or "none".
    pretrained: str = "none"
    pruner: PrunerSection = Field(default_factory=PrunerSection)
    episodes: EpisodeSection = Field(default_factory=EpisodeSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    #: total optimiser steps (each rank processes episodes.per_step episodes per step).
    steps: int = Field(200, ge=1)
    #: ray.train.report interval in steps (every worker reports; metrics are averaged over ranks).
    report_every: int = Field(10, ge=1)
    #: checkpoint interval in steps (a multiple of report_every); the last step always checkpoints.
    checkpoint_every: int = Field(50, ge=1)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    fault_injection: FaultInjection | None = None

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("pretrained is empty: give a directory, s3://bucket/prefix, or 'none'")
        if v.lower() == "none":
            return "none"
        if v.startswith("models:/"):  # a registered backbone (stamp backbones register) or pruner
            return v
        if "://" in v:
            return _check_storage_path(v) or v
        return str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _intervals(self) -> "MetaTrainConfig":
        if self.checkpoint_every % self.report_every:
            raise ValueError(
                f"checkpoint_every: {self.checkpoint_every} must be a multiple of report_every ({self.report_every}): "
                "checkpoints travel with reports"
            )
        if self.validation.every and self.validation.every % self.report_every:
            raise ValueError(
                f"validation.every: {self.validation.every} must be a multiple of report_every ({self.report_every})"
            )
        fi = self.fault_injection
        if fi is not None and fi.rank >= self.scaling.num_workers:
            raise ValueError(f"fault_injection.rank: rank {fi.rank} does not exist with {self.scaling.num_workers} worker(s)")
        if self.pruner.task_norm == "batch" and self.episodes.per_step < 2:
            raise ValueError(
                f"episodes.per_step: {self.episodes.per_step} episode per step cannot be standardised against "
                "others: use >= 2 with pruner.task_norm=batch, or pruner.task_norm=running (v1)"
            )
        if self.episodes.max_support < self.episodes.ways[1]:
            raise ValueError(
                f"episodes.max_support: {self.episodes.max_support} is below ways max ({self.episodes.ways[1]}): "
                "every class needs at least one support image"
            )
        return self

    def meta_config_hash(self) -> str:
        """Hash of what defines the trajectory; steps, names and infrastructure may change on resume."""
        return self.config_hash(exclude=("run_name", "storage_path", "steps", "mlflow", "max_failures",
                                         "keep_checkpoints", "fault_injection", "scaling", "validation"))


class SearchRange(_Strict):
    """A numeric search dimension: uniform in [low, high] (log-uniform when ``log``)."""

    low: float
    high: float
    log: bool = True

    @model_validator(mode="after")
    def _range(self) -> "SearchRange":
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"low: expected finite low <= high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low: a log range needs low > 0, got low={self.low}")
        return self


class SearchSpace(_Strict):
    """Tuned hyper-parameters; a dimension left null keeps meta_train's value."""

    kl_weight: SearchRange | None = SearchRange(low=1e-6, high=1e-2)
    macs_weight: SearchRange | None = SearchRange(low=1.0, high=100.0)
    lr: SearchRange | None = SearchRange(low=1e-4, high=1e-2)
    backbone_lr: SearchRange | None = SearchRange(low=1e-5, high=1e-3)


class AshaSection(_Strict):
    """ASHA early stopping on the validation metric; time is measured in training steps."""

    grace_period: int = Field(10, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


# ``register`` is the natural YAML key; it shadows ABCMeta.register on the class (never used on configs).
warnings.filterwarnings("ignore", message='Field name "register" in "TuneConfig" shadows', category=UserWarning)


class TuneConfig(_Strict):
    """Hyper-parameter search over meta-training with Ray Tune (one TorchTrainer per trial)."""

    kind: Literal["tune"] = "tune"
    name: str = "stamp-tune"
    #: where Tune and the trials' Train runs keep results; None = STATE_DIR/ray_results.
    storage_path: str | None = None
    #: the trial template; ``meta_train.validation`` is the objective.
    meta_train: MetaTrainConfig = Field(default_factory=MetaTrainConfig)
    search: SearchSpace = Field(default_factory=SearchSpace)
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    scheduler: AshaSection = Field(default_factory=AshaSection)
    #: CPUs the trial's driver function holds (the TorchTrainer's workers ask for their own).
    trial_driver_cpus: float = Field(0.0, ge=0)
    seed: int = 0
    #: register the best pruner in MLflow and move the alias only if it beats the current holder.
    register: bool = False
    model_name: str = "stamp-pruner"
    champion_alias: str = "champion"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "name")

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        return _check_storage_path(v)

    @model_validator(mode="after")
    def _tune_checks(self) -> "TuneConfig":
        if not self.meta_train.validation.enabled:
            raise ValueError("meta_train.validation.enabled: must be true: it is the tuning objective")
        if self.scheduler.grace_period > self.meta_train.steps:
            raise ValueError(
                f"scheduler.grace_period: {self.scheduler.grace_period} exceeds meta_train.steps ({self.meta_train.steps})"
            )
        return self

    def flat_params(self) -> dict[str, str]:
        return _flatten(self.model_dump(mode="json"))


BENCHMARK_METHODS = ("full", "uniform", "random", "l1", "snip", "grasp", "synflow", "bbd", "stamp", "stamp_mean")


def _unique(v: list[Any], what: str) -> list[Any]:
    if not v:
        raise ValueError(f"{what} is empty: give at least one")
    if len(set(v)) != len(v):
        raise ValueError(f"{what} lists a value twice: {v}")
    return v


class BenchmarkModel(_Strict):
    """One backbone under test: its meta-trained pruner and (for the baselines) its pretrained weights."""

    #: backbone name; must be the pruner's backbone (checked when the pruner loads).
    backbone: str
    #: the pruner: a saved pruner directory, a Ray meta-train run directory (latest checkpoint),
    #: or a registry URI (models:/stamp-pruner@champion).
    pruner: str
    #: pretrain checkpoint or run directory whose weights the baselines prune; None = the pruner's backbone.
    pretrained: str | None = None

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        return _check_backbone(v)

    @field_validator("pruner", "pretrained")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty: give a directory or a models:/ URI")
        return _check_uri_has_no_password(v)


class BenchmarkTarget(_Strict):
    """An unseen target dataset: a ``load_source`` spec (``npz:PATH?classes=6,7``, ``digits``,
    ``folder:PATH``), ``catalog:NAME`` or ``s3://BUCKET/PREFIX/NAME``."""

    name: str
    data: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "target name")

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("data is empty: give a dataset spec such as digits or npz:PATH?classes=6,7,8,9")
        return _check_uri_has_no_password(v) or v


class BenchFinetuneSection(_Strict):
    """The fine-tune every method gets after pruning (same budget for all)."""

    epochs: int = Field(3, ge=0, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0, le=10)
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = True
    #: further fine-tune lengths (epochs) for the accuracy-vs-epochs view, each a complete schedule from the
    #: same pruned start; 0 (the prototype head) and ``epochs`` are always recorded.
    curve: list[int] = Field(default_factory=lambda: [1])

    @field_validator("curve")
    @classmethod
    def _curve(cls, v: list[int]) -> list[int]:
        if any(e < 0 for e in v):
            raise ValueError(f"epoch counts must be >= 0, got {v}")
        return sorted(set(v))


class BenchBBDSection(_Strict):
    """Beta-Bernoulli dropout training on the target (its own budget, reported as mask time)."""

    epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.01, gt=0, le=10)
    gate_lr: float = Field(0.05, gt=0, le=10)
    kl_weight: float | None = Field(None, ge=0)
    macs_weight: float = Field(20.0, ge=0)


class BenchAblationSection(_Strict):
    """Where the mean task embedding of the ``stamp_mean`` ablation comes from: source tasks only."""

    #: dataset specs of the sources (meta-validation data); required when stamp_mean is run.
    sources: list[str] = Field(default_factory=list)
    split: Literal["train", "test"] = "test"
    tasks: int = Field(8, ge=1, le=10_000)
    ways: int = Field(5, ge=1)
    per_class: int = Field(20, ge=1)
    seed: int = 0


class BenchLatencySection(_Strict):
    """CPU latency: median of ``repeats`` forward passes at a fixed thread count."""

    threads: int = Field(1, ge=1, le=512)
    repeats_b1: int = Field(10, ge=1)
    repeats_b64: int = Field(3, ge=1)


class BenchmarkConfig(_Strict):
    """STAMP against pruning baselines on unseen targets at matched MACs (``stamp benchmark``)."""

    kind: Literal["benchmark"] = "benchmark"
    name: str = "benchmark"
    #: output directory (results.csv, results.md, PNGs); None = STATE_DIR/benchmark/<name>.
    out_dir: str | None = None
    models: list[BenchmarkModel]
    targets: list[BenchmarkTarget]
    methods: list[str] = Field(default_factory=lambda: list(BENCHMARK_METHODS))
    #: weight sets every mask is applied to: "pretrained" (models[].pretrained) and "meta" (the pruner's
    #: meta-trained backbone); None = both where every model has pretrained weights, else "meta".
    weights: list[Literal["pretrained", "meta"]] | None = None
    #: with two or more targets, also apply STAMP's mask generated for each *other* target (``stamp@U``
    #: cells): the adaptivity matrix.
    adaptivity: bool = True
    #: compute only this share of the grid, "K/N" (cells K, K+N, ... of the plan), so N processes can
    #: fill one results.csv in parallel; the report covers every recorded cell either way.
    shard: str | None = None
    #: MACs budgets r (pruned / full); "full" runs once per target, backbone and seed.
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.3, 0.1])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    #: training images per class drawn (per seed) from the target's train split; None = all.
    max_train_per_class: int | None = Field(100, ge=1)
    #: test images per class (fixed subset, the same for every method and seed); None = all.
    max_test_per_class: int | None = Field(200, ge=1)
    #: "test": score on the target's test split (claims). "dev": never read the test split; score on
    #: ``dev_per_class`` images per class held out of the *train* split (the same for every method and
    #: seed) and draw training subsets from the rest: the split method development may look at.
    evaluate_on: Literal["test", "dev"] = "test"
    dev_per_class: int = Field(50, ge=1)
    #: images per class the STAMP set encoder reads.
    sample_per_class: int = Field(20, ge=1)
    #: class-balanced images in the one batch SNIP and GraSP score on.
    score_batch: int = Field(128, ge=2)
    #: recompute BatchNorm statistics on the target's training images after pruning (every method).
    recalibrate_bn: bool = True
    round_to: int = Field(1, ge=1)
    finetune: BenchFinetuneSection = Field(default_factory=BenchFinetuneSection)
    bbd: BenchBBDSection = Field(default_factory=BenchBBDSection)
    ablation: BenchAblationSection = Field(default_factory=BenchAblationSection)
    latency: BenchLatencySection = Field(default_factory=BenchLatencySection)
    #: torch threads for everything else (mask, fine-tune); None = torch's default.
    threads: int | None = Field(None, ge=1, le=512)
    #: where fine-tuning and evaluation run ("cpu", "cuda", "cuda:1"); masks, MACs and latency stay on CPU.
    device: str = "cpu"
    #: recompute cells recorded as failed when the run is resumed.
    retry_failed: bool = True
    mlflow: MlflowSection = Field(default_factory=lambda: MlflowSection(experiment="stamp-benchmark"))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "name")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r} is not supported: expected cpu, cuda or cuda:N")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from stamp_core.baselines import list_criteria  # the criteria registry: user-registered ones count

        known = ["full", "stamp", "stamp_mean", *list_criteria()]
        unknown = [m for m in v if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: expected some of {', '.join(known)}")
        return _unique(v, "methods")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        for r in v:
            if not (math.isfinite(r) and 0.0 < r <= 1.0):
                raise ValueError(f"budget {r} is not in (0, 1]: a budget is pruned MACs / full MACs, e.g. 0.3")
        return _unique(v, "budgets")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _unique(v, "seeds")

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        m = re.fullmatch(r"(\d+)/(\d+)", str(v)) if v is not None else None
        if v is not None and not (m and 1 <= int(m.group(1)) <= int(m.group(2))):
            raise ValueError(f"shard {v!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
        return v

    def shard_index(self) -> tuple[int, int]:
        """(K - 1, N) of ``shard``; (0, 1) without one."""
        if self.shard is None:
            return 0, 1
        k, n = self.shard.split("/")
        return int(k) - 1, int(n)

    @model_validator(mode="after")
    def _bench_checks(self) -> "BenchmarkConfig":
        _unique([m.backbone for m in self.models], "models (backbone names)")
        _unique([t.name for t in self.targets], "targets (names)")
        missing = [m.backbone for m in self.models if not m.pretrained]
        if self.weights is None:
            self.weights = ["meta"] if missing else ["pretrained", "meta"]
        _unique(self.weights, "weights")
        if "pretrained" in self.weights and missing:
            raise ValueError(
                f"weights: the pretrained weight set needs models[].pretrained: {', '.join(missing)} has none; "
                "add it or set weights: [meta]"
            )
        if "stamp_mean" in self.methods and not self.ablation.sources:
            raise ValueError(
                "ablation.sources: the stamp_mean method needs source dataset specs to average task "
                "embeddings over (never the targets); add them or drop stamp_mean from methods"
            )
        return self

    def flat_params(self) -> dict[str, str]:
        return _flatten(self.model_dump(mode="json"))


JobConfig = Union[PretrainConfig, MetaTrainConfig, TuneConfig]
_KINDS: dict[str, type[BaseModel]] = {"pretrain": PretrainConfig, "meta_train": MetaTrainConfig, "tune": TuneConfig,
                                       "benchmark": BenchmarkConfig}
M = TypeVar("M", bound=BaseModel)


# ----------------------------------------------------------------------------------- loading


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as a YAML scalar/flow value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. optim.lr=0.001)")
    parts = key.split(".")
    for p in parts:
        if not _KEY_RE.fullmatch(p):
            raise ConfigError(f"override {text!r}: {key!r} is not a dotted key (letters, digits, '_')")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``a.b=value`` in a copy of ``data`` (intermediate sections are created)."""
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"{where}: is a value, not a section, so {'.'.join(parts)} cannot be set")
            node = child
        node[parts[-1]] = value
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``dotted.key: message``."""
    lines = []
    for err in exc.errors():
        # Union branches add type tags (e.g. 'list[str]') to the location: drop them.
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # Cross-field checks cannot set a location; they start their message with "key: ".
        named = _NAMED_MSG_RE.match(msg)
        if named and err["type"] == "value_error":
            loc.append(named.group(1))
            msg = msg[named.end():]
        key = ".".join(loc) or "(top level)"
        lines.append(f"{key}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def validate_config(data: dict[str, Any], model: type[M], source: str = "config") -> M:
    """Validate plain data against ``model``; ConfigError naming each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}")
    kind = data.get("kind")
    expected = model.model_fields["kind"].default if "kind" in model.model_fields else None
    if kind is not None and expected is not None and kind != expected:
        raise ConfigError(f"{source}: kind: this is a {kind!r} config, but a {expected!r} config is expected")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}:\n{format_validation_error(exc)}") from None


def load_config(path: str | Path, overrides: Sequence[str] = (), model: type[M] | None = None) -> M:
    """Read a YAML config, apply ``key=value`` overrides and validate.

    Args:
        path: YAML file; its ``kind`` (pretrain | meta_train | tune) picks the model when
            ``model`` is not given.
        overrides: ``a.b=value`` strings; values are YAML (``0.001``, ``[2, 5]``, ``true``, ``null``).
        model: the expected config class (the jobs pass theirs).

    Raises:
        ConfigError: unreadable file, bad YAML, unknown kind, or invalid keys/values (all named).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level, got {type(data).__name__}")
    if model is None:
        kind = apply_overrides(data, overrides).get("kind")
        if kind not in _KINDS:
            raise ConfigError(f"{p}: kind: expected one of {', '.join(_KINDS)} (got {kind!r})")
        model = _KINDS[kind]  # type: ignore[assignment]
    if overrides:
        # Overrides land on the defaults too, so `search.lr.low=...` keeps the default `high`.
        # model_construct: the defaults without validation (a benchmark has required keys).
        data = _deep_merge(model.model_construct().model_dump(mode="json"), data)  # type: ignore[misc,attr-defined]
        data = apply_overrides(data, overrides)
    return validate_config(data, model, source=str(p))  # type: ignore[arg-type]


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------- resolution


def resolved_catalog_url(cfg: DataConfig) -> str:
    """The configured catalog URL, else the platform's (settings)."""
    if cfg.catalog_url:
        return cfg.catalog_url if "://" in cfg.catalog_url else str(Path(cfg.catalog_url).expanduser().resolve())
    from pipeline.settings import get_settings

    return get_settings().catalog_url


def resolved_storage_path(storage_path: str | None) -> str:
    """The configured storage path, else ``STATE_DIR/ray_results``."""
    if storage_path:
        return storage_path
    from pipeline.settings import get_settings

    return str(get_settings().state_dir / "ray_results")


def resolved_tracking_uri(cfg: MlflowSection) -> str:
    """The configured MLflow URI, else settings (MLFLOW_TRACKING_URI, the stack, a local sqlite file)."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    from pipeline.settings import get_settings

    return get_settings().mlflow_uri
