"""The one prune path: mask -> physical pruning -> BatchNorm recalibration -> prototype head -> fine-tune.

Every consumer goes through here: ``stamp prune`` (downstream), meta-validation and Tune, the demo
and the benchmark. Methods differ only in how the mask (a :class:`PruneSpec`) is obtained: STAMP's
one pass (:func:`prune_for_task`), or any baseline's scores turned into a spec
(:func:`stamp_core.baselines.select_spec`). What happens to the mask afterwards is identical, so a
difference in accuracy is the mask's (and the weights'), never the plumbing's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from stamp_core.channel_generator import TaskSummary
from stamp_core.backbones import Backbone, build_backbone_from_config, task_classes
from stamp_core.pruner import StampPruner, load_weights
from stamp_core.spec import PruneSpec
from stamp_core.supervised import TrainConfig, evaluate_accuracy, init_classifier_from_prototypes, train_classifier


def default_finetune(epochs: int = 3, seed: int = 0) -> TrainConfig:
    """Fine-tune settings for a freshly pruned network.

    A tenth of the pretraining peak rate: the pruned net starts from meta-trained weights and a
    prototype head, and the pretraining rate (0.05) undid that start within one epoch in our runs.
    """
    return TrainConfig(epochs=epochs, lr=0.01, seed=seed)


@dataclass
class PruneResult:
    """What pruning one task produced."""

    spec: PruneSpec | None  #: the mask applied (None: the full network)
    model: Backbone  #: the physically pruned, fine-tuned network
    accuracy_before_finetune: float | None  #: prototype head only, on the test split
    accuracy: float | None  #: after fine-tuning, on the test split
    prune_seconds: float  #: data in hand -> pruned architecture with weights and head
    finetune_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    #: epochs -> (test accuracy, fine-tune seconds) of complete fine-tunes of the same start (``curve_epochs``);
    #: 0 is the prototype head and the fine-tune of ``finetune.epochs`` is always included.
    curve: dict[int, tuple[float, float]] = field(default_factory=dict)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> None:
    """Recompute every BatchNorm's running statistics on ``x`` (train-mode forward, no gradient).

    A pruned network keeps the statistics its full parent measured on the source data; both the
    removed channels and the new domain change what each norm sees. Without this step eval-mode
    features (prototype head, test accuracy) and train-mode features (fine-tuning) disagree so
    much that a short fine-tune of a magnitude-pruned net ends at chance in our runs. It is one
    pass over the target's training images, applied to every method alike.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    if len(x) == 0:
        raise ValueError("recalibrate_batchnorm needs at least one image")
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every image counts equally
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            if len(x[i:i + batch_size]) > 1 or i == 0:  # train-mode BN refuses a batch of one
                model(x[i:i + batch_size])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def build_task_model(
    weights: Backbone,
    spec: PruneSpec | None,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    recalibrate_bn: bool = True,
) -> Backbone:
    """A copy of ``weights`` pruned by ``spec``, with task BatchNorm statistics and a prototype head.

    Args:
        weights: the backbone whose weights are pruned (left untouched; a copy is returned).
        spec: the mask; None keeps the full network (the unpruned reference).
        x_train, y_train: prepared images and labels ``0..K-1`` of the target task.
        recalibrate_bn: recompute BatchNorm statistics on ``x_train`` (see :func:`recalibrate_batchnorm`).
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ValueError(f"got {len(x_train)} images and {len(y_train)} labels: expected the same, non-zero count")
    # Rebuilt from config + state_dict rather than deep-copied: no hooks or gates travel along.
    model = build_backbone_from_config(weights.config)
    model.load_state_dict(weights.state_dict())
    if spec is not None:
        spec.apply(model)
    model.reset_classifier(task_classes(y_train))
    if recalibrate_bn:
        recalibrate_batchnorm(model, x_train)
    init_classifier_from_prototypes(model, x_train, y_train)
    return model.eval()


def _finetune(model: Backbone, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, recalibrate_bn: bool,
              on_epoch: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Fine-tune, then (``recalibrate_bn``) measure BatchNorm statistics of the *final* weights ("precise BN").

    A short fine-tune leaves the running statistics an exponential average over weights that kept
    changing: on a freshly pruned net with few steps per epoch the eval-mode network then scored
    below its own prototype head (sklearn digits, resnet20, r=0.3: 69.6% before, 63.2% after one
    epoch; train-mode accuracy stayed higher). One more pass over the training images fixes that.
    """
    if cfg.epochs <= 0:
        return []
    history = train_classifier(model, x, y, cfg, on_epoch=on_epoch)
    if recalibrate_bn:
        recalibrate_batchnorm(model, x)
    return history


def prune_and_finetune(
    weights: Backbone,
    spec: PruneSpec | None,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    finetune: TrainConfig | None = None,
    recalibrate_bn: bool = True,
    curve_epochs: Sequence[int] = (),
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> PruneResult:
    """Apply a mask to ``weights`` and fine-tune the small network on the task: the whole path after the mask.

    Args:
        weights: the backbone whose weights are pruned (a copy is made).
        spec: the mask; None fine-tunes the full network the same way (the reference).
        x_train, y_train: prepared images and labels ``0..K-1`` of the target task.
        x_test, y_test: optional held-out split for the accuracies.
        finetune: fine-tune settings (:func:`default_finetune` if None); ``epochs=0`` keeps the prototype head.
        recalibrate_bn: recompute BatchNorm statistics on ``x_train`` before the head is built and
            again after fine-tuning (statistics of the final weights).
        curve_epochs: also fine-tune copies of the same start for these numbers of epochs, each a
            complete schedule, and record their test accuracy and time in ``curve`` (needs a test split).
        on_epoch: called with each epoch's record (epoch, loss, accuracy, seconds) of the fine-tune.
    """
    finetune = finetune or default_finetune()
    has_test = x_test is not None and y_test is not None
    if curve_epochs and not has_test:
        raise ValueError("curve_epochs needs x_test and y_test: the curve is test accuracy per fine-tune length")
    if any(int(e) < 0 for e in curve_epochs):
        raise ValueError(f"curve_epochs={list(curve_epochs)}: expected non-negative epoch counts")
    t0 = time.perf_counter()
    model = build_task_model(weights, spec, x_train, y_train, recalibrate_bn=recalibrate_bn)
    prune_seconds = time.perf_counter() - t0
    acc0 = evaluate_accuracy(model, x_test, y_test) if has_test else None
    curve: dict[int, tuple[float, float]] = {0: (acc0, 0.0)} if has_test else {}
    for epochs in sorted({int(e) for e in curve_epochs} - {0, finetune.epochs}):
        branch = copy.deepcopy(model)
        t = time.perf_counter()
        _finetune(branch, x_train, y_train, dataclasses.replace(finetune, epochs=epochs), recalibrate_bn)
        curve[epochs] = (evaluate_accuracy(branch, x_test, y_test), time.perf_counter() - t)
    t1 = time.perf_counter()
    history = _finetune(model, x_train, y_train, finetune, recalibrate_bn, on_epoch)
    finetune_seconds = time.perf_counter() - t1
    acc = evaluate_accuracy(model, x_test, y_test) if has_test else None
    if has_test:
        curve[finetune.epochs] = (acc, finetune_seconds)
    return PruneResult(spec, model, acc0, acc, prune_seconds, finetune_seconds, history, dict(sorted(curve.items())))


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
    embedding: TaskSummary | torch.Tensor | None = None,
    recalibrate_bn: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> PruneResult:
    """STAMP's mask for the task ``(x_train, y_train)``, then :func:`prune_and_finetune` on the pruner's weights.

    Args:
        pruner: a meta-trained pruner.
        x_train, y_train: prepared images and labels ``0..K-1`` of the target task.
        x_test, y_test: optional held-out split for the accuracies.
        macs_ratio: budget ``r`` in (0, 1].
        finetune: fine-tune settings; ``epochs=0`` keeps the prototype head only.
        round_to: channel multiple per group.
        use_labels: give labels to the set encoder (two-level pooling).
        embedding: task summary override (the mean-embedding ablation).
        recalibrate_bn: recompute BatchNorm statistics on the task's training images.
        on_epoch: called with each fine-tune epoch's record (epoch, loss, accuracy, seconds).

    The budget is met by the net returned, whose head has :func:`task_classes` outputs.
    """
    x_train, y_train = pruner.check_images(x_train, y_train)
    t0 = time.perf_counter()
    spec = pruner.generate(x_train, y_train if use_labels else None, macs_ratio=macs_ratio, round_to=round_to,
                          embedding=embedding, num_classes=task_classes(y_train))
    generate_seconds = time.perf_counter() - t0
    result = prune_and_finetune(pruner.backbone, spec, x_train, y_train, x_test, y_test, finetune, recalibrate_bn,
                                on_epoch=on_epoch)
    result.prune_seconds += generate_seconds
    return result


def build_pruned_model(spec: PruneSpec, state: Mapping[str, torch.Tensor]) -> Backbone:
    """The pruned network from its spec and state_dict (eval mode); the architecture comes from the
    backbone definition and the spec, never from a pickled module."""
    if "classifier.weight" not in state:
        raise ValueError("the state_dict has no classifier.weight: not a STAMP backbone state_dict")
    model = build_backbone_from_config(spec.backbone)
    spec.apply(model)
    model.reset_classifier(int(state["classifier.weight"].shape[0]))
    model.load_state_dict(state)
    return model.eval()


def load_pruned_model(spec_path: str | os.PathLike[str], weights_path: str | os.PathLike[str]) -> Backbone:
    """Rebuild a pruned network from a PruneSpec JSON file and its state_dict file.

    The weights are read with ``weights_only=True`` and must match the ``weights_sha256`` the
    spec records (when it records one), so a spec never describes another run's weights.
    """
    spec = PruneSpec.load(spec_path)
    data = Path(weights_path).read_bytes()
    expected = spec.metadata.get("weights_sha256")
    if expected is not None and expected != hashlib.sha256(data).hexdigest():
        raise ValueError(f"{weights_path} does not belong to {spec_path} (sha256 mismatch): expected the weights written with that spec")
    state = load_weights(io.BytesIO(data), "cpu", what=str(weights_path))
    try:
        return build_pruned_model(spec, state)
    except ValueError as exc:
        raise ValueError(f"{weights_path}: {exc}") from None
