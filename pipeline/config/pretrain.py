"""The pretraining job's config (``kind: pretrain``): supervised training of the backbone on the sources."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import JobBase, MlflowSection

class PretrainConfig(JobBase):
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
    #: the rule may stop the run only after this fraction of ``epochs``: under a decaying schedule a plateau at a
    #: high learning rate is the learning rate's noise floor, not convergence (0 = from the first epoch it can judge).
    early_stop_from: float = Field(0.0, ge=0, lt=1)
    mlflow: MlflowSection = Field(default_factory=lambda: MlflowSection(experiment="stamp-pretrain"))

    @model_validator(mode="after")
    def _early_stop_needs_eval(self) -> "PretrainConfig":
        if self.early_stop_epochs is not None and self.eval_samples == 0:
            raise ValueError("early_stop_epochs needs eval_samples > 0: the stopping rule reads the test accuracy")
        return self

