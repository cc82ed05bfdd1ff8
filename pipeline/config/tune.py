"""The tuning job's config (``kind: tune``): a Ray Tune search over meta-training's hyper-parameters."""

from __future__ import annotations

import math
import warnings
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Strict, check_name, check_storage_path, flatten
from pipeline.config.meta_train import MetaTrainConfig

class SearchRange(Strict):
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


class SearchSpace(Strict):
    """Tuned hyper-parameters; a dimension left null keeps meta_train's value. The defaults suit the relaxed
    objective; a deployed-objective template must null ``kl_weight`` and ``macs_weight`` (it ignores them) and
    may search ``es_sigma`` (layer_es) or ``inner_lr`` instead."""

    kl_weight: SearchRange | None = SearchRange(low=1e-6, high=1e-2)
    macs_weight: SearchRange | None = SearchRange(low=1.0, high=100.0)
    lr: SearchRange | None = SearchRange(low=1e-4, high=1e-2)
    backbone_lr: SearchRange | None = SearchRange(low=1e-5, high=1e-3)
    es_sigma: SearchRange | None = None
    inner_lr: SearchRange | None = None


class AshaSection(Strict):
    """ASHA early stopping on the validation metric; time is measured in training steps."""

    grace_period: int = Field(10, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


# ``register`` is the natural YAML key; it shadows ABCMeta.register on the class (never used on configs).
warnings.filterwarnings("ignore", message='Field name "register" in "TuneConfig" shadows', category=UserWarning)


class TuneConfig(Strict):
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
        return check_name(v, "name")

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        return check_storage_path(v)

    @model_validator(mode="after")
    def _tune_checks(self) -> "TuneConfig":
        if not self.meta_train.validation.enabled:
            raise ValueError("meta_train.validation.enabled: must be true: it is the tuning objective")
        optim = self.meta_train.optim
        ignored = []
        if optim.objective == "deployed":
            ignored += ["kl_weight"] + ([] if optim.deployed_macs_penalty else ["macs_weight"])
        if optim.objective != "deployed" or optim.deployed_gradient != "layer_es":
            ignored.append("es_sigma")
        if optim.inner_steps == 0:
            ignored.append("inner_lr")
        searched = [k for k in ignored if getattr(self.search, k) is not None]
        if searched:
            raise ValueError(
                f"search.{searched[0]}: meta_train.optim (objective {optim.objective!r}, deployed_gradient "
                f"{optim.deployed_gradient!r}, inner_steps {optim.inner_steps}) ignores {', '.join(searched)}: trials would "
                f"differ only by noise; set search.{searched[0]}: null and search what this objective reads")
        if self.scheduler.grace_period > self.meta_train.steps:
            raise ValueError(
                f"scheduler.grace_period: {self.scheduler.grace_period} exceeds meta_train.steps ({self.meta_train.steps})"
            )
        return self

    def flat_params(self) -> dict[str, str]:
        return flatten(self.model_dump(mode="json"))

