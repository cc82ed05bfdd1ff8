"""The outcome pruner's fitting job (``kind: fit_pruner``): a ``generator: outcome`` pruner from an outcome table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import MlflowSection, Strict, check_name, check_uri_has_no_password, flatten, unique
from stamp_core.candidates import MaskCandidate


class FitMlflowSection(MlflowSection):
    """Where the fitted pruner is logged and registered (a new version of ``model_name``)."""

    experiment: str = "stamp-fit-pruner"
    model_name: str = "stamp-pruner"


class FitPrunerConfig(Strict):
    """Fit the outcome predictor on a table, choosing its penalty on held-out groups of source tasks."""

    kind: Literal["fit_pruner"] = "fit_pruner"
    run_name: str = "stamp-outcome"
    #: the outcome table: an outcomes run location (s3://BUCKET/outcomes/NAME or a directory) or its table.jsonl.
    table: str
    #: the backbone the table was measured on (checked against the table): models:/ URI, backbones/ name, directory.
    pretrained: str
    #: the candidates the pruner chooses from (None = every candidate the table scored).
    candidates: list[str] | None = None
    #: penalties tried on the feature terms; the one whose held-out picks score best is kept.
    ridges: list[float] = Field(default_factory=lambda: [0.3, 3.0, 30.0])
    #: what a held-out group is when choosing the penalty: a whole source family, or a class subset's domains.
    holdout: Literal["family", "class_subset"] = "family"
    image_size: int = Field(32, ge=8, le=512)
    #: images per class (and in all) of the sample the pruner reads at prune time.
    support_per_class: int = Field(20, ge=1, le=10_000)
    max_support: int = Field(400, ge=1, le=100_000)
    #: where the pruner is saved (None = STATE_DIR/pruners/<run_name>).
    out_dir: str | None = None
    mlflow: FitMlflowSection = Field(default_factory=FitMlflowSection)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        return check_name(v, "run_name")

    @field_validator("table", "pretrained")
    @classmethod
    def _location(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("is empty: give a location")
        if "://" not in v and "/" in v and not v.startswith("models:/"):
            return str(Path(v).expanduser().resolve())
        return check_uri_has_no_password(v) or v

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        for name in unique(v, "candidates"):
            MaskCandidate.parse(name)
        return v

    @field_validator("ridges")
    @classmethod
    def _ridges(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(p) or p < 0 for p in unique(v, "ridges")):
            raise ValueError(f"ridges={v}: expected finite penalties >= 0")
        return v

    def flat_params(self) -> dict[str, str]:
        return flatten(self.model_dump(mode="json"))
