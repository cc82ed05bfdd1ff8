"""The outcome table's config (``kind: outcomes``): deployed accuracy of candidate masks on source tasks.

One row per (source task, budget, candidate mask, fine-tune seed): the accuracy the mask reaches after the
real prune path (physical pruning, BatchNorm recalibration, prototype head, fine-tune) on images held out of
the task's training split, next to what one forward pass of the task's sample tells about the task. What a
one-pass pruner learns to choose from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import JobBase, MlflowSection, Strict, check_storage_path, unique
from stamp_core.candidates import MaskCandidate

#: the candidate family of the natural-image world: allocations between L1's and uniform width, tilted
#: towards deep layers, each with L1 or class-separability ranking (issue 24's headroom study's winners)
DEFAULT_CANDIDATES = ("l1", "uniform", "mix0.5", "tilt+1", "mix0.5tilt+1", "mix1tilt+1",
                      "separability_in_l1", "separability_in_uniform", "separability_in_mix0.5",
                      "separability_in_tilt+1", "separability_in_mix0.5tilt+1", "separability_in_mix1tilt+1")


class OutcomeTasksSection(Strict):
    """How tasks are drawn from the source datasets (each draw: a class subset, its own images)."""

    #: tasks drawn from each source dataset (different class subsets when the dataset has enough classes).
    draws_per_source: int = Field(1, ge=1, le=100)
    #: classes per task, an inclusive range; capped at the dataset's class count.
    ways: tuple[int, int] = (5, 10)
    #: training images per class (the fine-tune's data); the dev images come from the rest of the train split.
    train_per_class: int = Field(50, ge=2)
    #: dev images per class, held out of the dataset's training split (its test split is never read).
    dev_per_class: int = Field(50, ge=1)
    #: images per class of the sample one forward pass reads (what a pruner sees at prune time).
    sample_per_class: int = Field(20, ge=1)
    #: source patterns whose training images the backbone was pretrained on (e.g. tin-*): their tasks come
    #: from the dataset's test split instead, so no mask is measured on memorised images (fewer per class).
    unseen_split_for: list[str] = Field(default_factory=list)

    @field_validator("ways")
    @classmethod
    def _ways(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 2 <= v[0] <= v[1]:
            raise ValueError(f"ways={list(v)}: expected [low, high] with 2 <= low <= high")
        return v


class OutcomeFinetuneSection(Strict):
    """The fine-tune every candidate gets (``stamp prune``'s default: 3 epochs)."""

    epochs: int = Field(3, ge=0, le=1000)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0, le=10)


class OutcomesConfig(JobBase):
    """Fill the outcome table with Ray tasks, one per source task; resumable (finished tasks are skipped)."""

    kind: Literal["outcomes"] = "outcomes"
    run_name: str = "outcomes"
    #: the backbone every mask prunes: models:/stamp-backbone-NAME@champion, a backbones/ entry name,
    #: or a pretrain run / checkpoint directory.
    pretrained: str
    #: mask candidates by name (stamp_core.candidates grammar).
    candidates: list[str] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    budgets: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    seeds: list[int] = Field(default_factory=lambda: [0])
    tasks: OutcomeTasksSection = Field(default_factory=OutcomeTasksSection)
    finetune: OutcomeFinetuneSection = Field(default_factory=OutcomeFinetuneSection)
    #: stop after this many tasks of the plan are recorded (None = all): a partial table grows by re-running.
    max_tasks: int | None = Field(None, ge=1)
    mlflow: MlflowSection = Field(default_factory=lambda: MlflowSection(experiment="stamp-outcomes"))

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: str) -> str:
        v = v.strip()
        if not v or v.lower() == "none":
            raise ValueError("pretrained is required: a models:/ URI, a backbones/ name or a pretrain run directory")
        if v.startswith("models:/") or ("/" not in v and "://" not in v and not Path(v).exists()):
            return v  # a registered backbone or a backbones/ manifest name (checked when it loads)
        if "://" in v:
            return check_storage_path(v) or v
        return str(Path(v).expanduser().resolve())

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("candidates is empty: name at least one mask (e.g. l1, uniform, tilt+1)")
        for name in v:
            MaskCandidate.parse(name)
        return unique(v, "candidates")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if not v or any(not (0.0 < r <= 1.0) or not math.isfinite(r) for r in v):
            raise ValueError(f"budgets={v}: expected one or more MACs ratios in (0, 1]")
        return unique(v, "budgets")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds is empty: give at least one fine-tune seed")
        return unique(v, "seeds")

    @model_validator(mode="after")
    def _sources_named(self) -> "OutcomesConfig":
        if self.data.sources == "all":
            raise ValueError("data.sources: name the source datasets (patterns such as tin-* are fine); "
                             "'all' would also take any benchmark target a catalog holds")
        return self
