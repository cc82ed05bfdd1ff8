"""Plain supervised training used by reference pretraining and by the post-pruning fine-tune.

Inputs are prepared tensors (see ``prepare_images``) already in memory: both the pretrain job and
``stamp prune`` load their (small) datasets first, so this stays a tight loop with no data plumbing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import benchmark

from stamp_core.backbones import Backbone


@dataclass
class TrainConfig:
    """Hyper-parameters of supervised training (SGD + momentum, cosine schedule)."""

    epochs: int = 5  #: passes over the data
    batch_size: int = 128  #: images per step
    lr: float = 0.05  #: peak learning rate
    momentum: float = 0.9  #: SGD momentum
    weight_decay: float = 5e-4  #: L2 penalty
    augment: bool = True  #: random 2-px shifts (no flips: digits and glyphs are not symmetric)
    seed: int = 0  #: shuffling and augmentation seed


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift the whole batch by one random offset of up to ``pad`` pixels (edges replicated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator,
                     fill: float = -1.0) -> torch.Tensor:
    """The usual 32-px recipe, per image: pad by ``pad`` with ``fill``, crop back at a random offset, flip half.

    ``fill`` is in prepared-pixel units: -1.0 is black after :func:`prepare_images` (torchvision's
    ``RandomCrop(padding=pad)`` pads the raw image with black too).
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=fill) if pad else x
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    # One gather for the whole batch: row/column index maps per image, no Python loop over images.
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, padded.shape[-1])
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])
    if flip:
        flipped = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    return out.gather(3, cols[:, None, None, :].expand(n, x.shape[1], h, w))


#: below this many optimiser steps a warm-up has no room: the schedule is a plain cosine decay.
_MIN_WARMUP_STEPS = 10


def _schedule(opt: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle (15% warm-up from lr/25, then cosine) for real runs; cosine decay from ``lr`` for short ones.

    One-cycle over a handful of steps never reaches its peak: meta-validation fine-tunes 40 images
    for one epoch, a single step taken at lr/25, and accuracy before and after was identical.
    """
    if total_steps >= _MIN_WARMUP_STEPS:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * k / max(1, total_steps))))


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``(x, y)``; returns one record per epoch (loss, accuracy, seconds)."""
    cfg = cfg or TrainConfig()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"got {len(x)} images and {len(y)} labels: expected the same, non-zero count")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = max(1, (len(x) + cfg.batch_size - 1) // cfg.batch_size)
    sched = _schedule(opt, cfg.lr, cfg.epochs * steps_per_epoch)
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.augment:
                xb = random_shift(xb, 2, gen)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        record = {"epoch": epoch + 1, "loss": total_loss / len(x), "accuracy": correct / len(x),
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    model.eval()
    return history


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


@torch.no_grad()
def init_classifier_from_prototypes(model: Backbone, x: torch.Tensor, y: torch.Tensor, scale: float = 10.0) -> None:
    """Set the linear classifier to scaled normalised class means of the features (no training).

    Logits become ``scale * |f| / mean|f| * cos(f, prototype)``, the cosine head of meta-training.
    """
    was_training = model.training
    model.eval()
    feats = torch.cat([model.features(x[i:i + 256]) for i in range(0, len(x), 256)])
    model.train(was_training)
    k = model.classifier.out_features
    if int(y.max()) >= k:
        raise ValueError(f"labels go up to {int(y.max())} but the classifier has {k} outputs")
    sums = torch.zeros(k, feats.shape[1]).index_add_(0, y, feats)
    counts = torch.bincount(y, minlength=k).clamp_min(1).unsqueeze(1).float()
    protos = F.normalize(sums / counts, dim=1)
    norm = feats.norm(dim=1).mean().clamp_min(1e-6)
    model.classifier.weight.copy_(protos * scale / norm)
    model.classifier.bias.zero_()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads and restore the previous count after it.

    The count is process-global: a caller that set it and returned would change every later
    computation's speed and, through reduction order, its last bits. ``None`` leaves it as it is.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}: expected a positive thread count or None")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, int, int], batch_size: int, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of one forward pass of ``batch_size`` images (eval mode, current threads).

    Timed by ``torch.utils.benchmark.Timer`` (it pins the thread count and synchronises CUDA), one
    pass per measurement so that the median is over ``repeats`` single passes.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: expected repeats >= 1 and warmup >= 0")
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    try:
        for _ in range(warmup):
            model(x)
        runs = benchmark.Measurement.merge([timer.timeit(number=1) for _ in range(repeats)])
    finally:
        model.train(was_training)
    return float(runs[0].median)
