"""Meta-test for one task: generate a mask, build the small network, fine-tune it, measure it.

This is the whole downstream path in one call, used by ``stamp prune``, by meta-validation in
tuning and by the benchmark, so every consumer prunes and fine-tunes the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from stamp_core.backbones import Backbone
from stamp_core.pruner import StampPruner
from stamp_core.spec import PruneSpec
from stamp_core.train import TrainConfig, evaluate_accuracy, init_classifier_from_prototypes, train_classifier


def default_finetune(epochs: int = 3, seed: int = 0) -> TrainConfig:
    """Fine-tune settings for a freshly pruned network.

    A tenth of the pretraining peak rate: the pruned net starts from meta-trained weights and a
    prototype head, and the pretraining rate (0.05) undid that start within one epoch in our runs.
    """
    return TrainConfig(epochs=epochs, lr=0.01, seed=seed)


@dataclass
class PruneResult:
    """What pruning one task produced."""

    spec: PruneSpec
    model: Backbone  #: the physically pruned, fine-tuned network
    accuracy_before_finetune: float | None  #: prototype head only, on the test split
    accuracy: float | None  #: after fine-tuning, on the test split
    prune_seconds: float  #: data in hand -> pruned architecture with weights
    finetune_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def prune_for_task(
    pruner: StampPruner,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    macs_ratio: float = 0.5,
    finetune: TrainConfig | None = None,
    round_to: int = 1,
    use_labels: bool = True,
    embedding: torch.Tensor | None = None,
) -> PruneResult:
    """Prune ``pruner``'s backbone for the task ``(x_train, y_train)`` and fine-tune it.

    Args:
        pruner: a meta-trained pruner.
        x_train, y_train: prepared images and labels ``0..K-1`` of the target task.
        x_test, y_test: optional held-out split for the accuracies.
        macs_ratio: budget ``r`` in (0, 1].
        finetune: fine-tune settings; ``epochs=0`` keeps the prototype head only.
        round_to: channel multiple per group.
        use_labels: give labels to the set encoder (two-level pooling).
        embedding: task embedding override (the mean-embedding ablation).
    """
    finetune = finetune or default_finetune()
    x_train, y_train = pruner.check_images(x_train, y_train)
    num_classes = int(y_train.max()) + 1
    t0 = time.perf_counter()
    spec = pruner.generate(x_train, y_train if use_labels else None, macs_ratio=macs_ratio, round_to=round_to, embedding=embedding)
    model = pruner.build_pruned(spec, num_classes=num_classes)
    init_classifier_from_prototypes(model, x_train, y_train)
    prune_seconds = time.perf_counter() - t0
    has_test = x_test is not None and y_test is not None
    acc0 = evaluate_accuracy(model, x_test, y_test) if has_test else None
    t1 = time.perf_counter()
    history = train_classifier(model, x_train, y_train, finetune) if finetune.epochs > 0 else []
    finetune_seconds = time.perf_counter() - t1
    acc = evaluate_accuracy(model, x_test, y_test) if has_test else None
    return PruneResult(spec, model, acc0, acc, prune_seconds, finetune_seconds, history)
