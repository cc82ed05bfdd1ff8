"""The meta-training job's config (``kind: meta_train``): episodes, optimiser, pruner architecture, validation.

``OptimSection`` and ``PrunerSection`` are built from stamp_core's ``MetaConfig`` and ``PrunerConfig``
(:func:`pipeline.config.base.section_from_dataclass`): their fields, defaults and variant names come
from there; this module adds only the bounds a YAML value must respect and the optimiser's own keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import JobBase, Strict, check_name, check_storage_path, section_from_dataclass
from stamp_core.mask_generator import TASK_NORMS
from stamp_core.meta import BUDGET_PENALTIES, DEPLOYED_GRADIENTS, OBJECTIVES, PRECISIONS, MetaConfig
from stamp_core.pruner import GENERATORS, SCORE_INITS, PrunerConfig

class EpisodeSection(Strict):
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


class _OptimBase(Strict):
    def meta_config(self) -> MetaConfig:
        """stamp_core's ``MetaConfig`` of these settings (the optimiser's own keys left out)."""
        return MetaConfig(**self.model_dump(include={f.name for f in dataclasses.fields(MetaConfig)}))


#: Meta-training optimiser and loss weights: stamp_core.MetaConfig's fields (see there) plus the optimiser's.
OptimSection = section_from_dataclass(
    "OptimSection", MetaConfig, "Meta-training optimiser and loss weights (stamp_core.MetaConfig + make_optimizer).",
    bounds={
        "kl_weight": {"ge": 0}, "macs_weight": {"ge": 0}, "head_scale": {"gt": 0},
        "inner_steps": {"ge": 0, "le": 100}, "inner_lr": {"gt": 0}, "label_free_prob": {"ge": 0, "le": 1},
        "es_pairs": {"ge": 1, "le": 64}, "es_sigma": {"gt": 0},
    },
    choices={"budget_penalty": BUDGET_PENALTIES, "objective": OBJECTIVES, "deployed_gradient": DEPLOYED_GRADIENTS,
             "precision": PRECISIONS},
    extra={
        "lr": (float, Field(1e-3, gt=0, le=10)),  # encoder + generator learning rate
        "backbone_lr": (float, Field(1e-4, ge=0, le=10)),  # shared backbone learning rate (0 freezes it)
        "weight_decay": (float, Field(0.0, ge=0)),
        # max global gradient norm (stamp_core's meta_train_step also clips at 5, hence the cap)
        "grad_clip": (float, Field(5.0, gt=0, le=5.0)),
    },
    base=_OptimBase,
)


class _PrunerBase(Strict):
    @model_validator(mode="after")
    def _heads_divide(self) -> "_PrunerBase":
        if self.embed_dim % self.num_heads:  # type: ignore[attr-defined]
            raise ValueError(f"embed_dim: {self.embed_dim} must be a multiple of num_heads ({self.num_heads})")  # type: ignore[attr-defined]
        if self.generator == "outcome":  # type: ignore[attr-defined]
            raise ValueError("generator: 'outcome' is fitted from an outcome table (python jobs/fit_pruner.py), "
                             "not meta-trained by gradient: use 'channel' or 'faithful' here")
        return self


#: Architecture of the set encoder and mask generator: stamp_core.PrunerConfig's fields (see there)
#: less those the job sets itself (the backbone and image size, the encoder's set sizes from episodes).
PrunerSection = section_from_dataclass(
    "PrunerSection", PrunerConfig, "Architecture of the set encoder and mask generator (stamp_core.PrunerConfig).",
    bounds={"embed_dim": {"ge": 4}, "num_heads": {"ge": 1}, "num_inducing": {"ge": 1}, "hidden_dim": {"ge": 4},
            "prior_alpha": {"gt": 0}, "temperature": {"gt": 0}},
    choices={"score_init": SCORE_INITS, "task_norm": TASK_NORMS, "generator": GENERATORS},
    exclude=("backbone", "image_size", "support_per_class", "max_support", "version", "metadata", "candidates"),
    base=_PrunerBase,
)

class ValidationSection(Strict):
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
                check_name(s, "dataset name")
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        return check_name(v, "split name")


class FaultInjection(Strict):
    """Testing only: make ``rank`` exit abruptly after ``step``, once (the marker file records it)."""

    rank: int = Field(1, ge=0)
    step: int = Field(..., ge=1)
    #: created atomically before the exit; when it already exists nothing is injected.
    marker: str


class MetaTrainConfig(JobBase):
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
    #: allow the variants that lost their benchmarks, kept only to reproduce old results:
    #: optim.deployed_gradient plain / budget_neutral, optim.deployed_macs_penalty, pruner.task_norm running (v1).
    experimental: bool = False

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
            return check_storage_path(v) or v
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
                "others: use >= 2 with pruner.task_norm=batch (or experimental: true with pruner.task_norm=running, v1)"
            )
        if self.episodes.max_support < self.episodes.ways[1]:
            raise ValueError(
                f"episodes.max_support: {self.episodes.max_support} is below ways max ({self.episodes.ways[1]}): "
                "every class needs at least one support image"
            )
        self._refuse_no_ops_and_losing_variants()
        return self

    def _refuse_no_ops_and_losing_variants(self) -> None:
        """An option the chosen objective or gradient ignores is a config error, and so is a variant that lost."""
        optim = self.optim
        # "set" = differs from its default: a re-validated dump (Ray workers, Tune trials) names every field
        chosen = {k for k, f in type(optim).model_fields.items() if getattr(optim, k) != f.get_default(call_default_factory=True)}
        if optim.objective == "deployed":
            ignored = {"kl_weight", "budget_penalty", "label_free_prob"} | ({"macs_weight"} if not optim.deployed_macs_penalty else set())
            if optim.deployed_gradient != "layer_es":
                ignored |= {"es_pairs", "es_sigma"}
            why = f"objective 'deployed' with deployed_gradient {optim.deployed_gradient!r}"
        else:
            ignored = {"deployed_gradient", "deployed_macs_penalty", "es_pairs", "es_sigma"}
            why = "objective 'relaxed' (they belong to the deployed objective)"
        set_but_ignored = sorted(chosen & ignored)
        if set_but_ignored:
            raise ValueError(f"optim.{set_but_ignored[0]}: {why} ignores {', '.join(set_but_ignored)}: remove "
                             f"{'it' if len(set_but_ignored) == 1 else 'them'} (or choose the objective that reads "
                             f"{'it' if len(set_but_ignored) == 1 else 'them'})")
        if self.experimental:
            return
        lost = []
        if optim.objective == "deployed" and optim.deployed_gradient in ("plain", "budget_neutral"):
            lost.append(f"optim.deployed_gradient: {optim.deployed_gradient!r} lost to 'layer_es'")
        if optim.deployed_macs_penalty:
            lost.append("optim.deployed_macs_penalty: it cost adaptivity in the cross-evaluation")
        if self.pruner.task_norm == "running":
            lost.append("pruner.task_norm: 'running' (v1) lost to 'batch'")
        if lost:
            raise ValueError(f"{lost[0]}; kept only to reproduce old results: set experimental: true to use it")

    def meta_config_hash(self) -> str:
        """Hash of what defines the trajectory; steps, names and infrastructure may change on resume."""
        return self.config_hash(exclude=("run_name", "storage_path", "steps", "mlflow", "max_failures",
                                         "keep_checkpoints", "fault_injection", "scaling", "validation"))

