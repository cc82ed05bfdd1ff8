"""Two families of synthetic tasks that need different features, for stamp_core tests.

``color`` tasks: classes differ only by hue of a noisy patch (texture is random).
``orientation`` tasks: grayscale gratings whose classes differ only by orientation (colour is random
brightness). A pruner that adapts to the task should keep different channels for the two.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from stamp_core import StampPruner, TaskSummary, TrainConfig, build_backbone, prune_and_finetune, train_classifier
from stamp_core.meta import Episode

FAMILIES = ("color", "orientation")

_HUES = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1], [1.0, 0.1, 1.0], [0.1, 1.0, 1.0]])


def make_images(family: str, labels: torch.Tensor, gen: torch.Generator, size: int = 32) -> torch.Tensor:
    n = len(labels)
    if family == "color":
        base = _HUES[labels % len(_HUES)].view(n, 3, 1, 1)
        tex = torch.rand(n, 1, size, size, generator=gen)
        # Weak colour on a strong random grey texture: hue is the only class cue.
        x = 0.25 * base * tex + 0.75 * torch.rand(n, 1, size, size, generator=gen)
    elif family == "orientation":
        theta = labels.float() * math.pi / 6 + 0.15 * torch.randn(n, generator=gen)
        freq = 0.6 + 0.2 * torch.rand(n, generator=gen)
        phase = 2 * math.pi * torch.rand(n, generator=gen)
        yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        proj = xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]
        g = 0.5 + 0.5 * torch.sin(freq[:, None, None] * proj + phase[:, None, None])
        x = g[:, None].expand(n, 3, size, size) * (0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen))
    else:
        raise ValueError(family)
    x = (x + 0.25 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return (x - 0.5) / 0.5


def make_episode(family: str, gen: torch.Generator, ways: int = 6, shots: int = 10, query: int = 32, macs_ratio: float | None = None) -> Episode:
    classes = torch.randperm(6, generator=gen)[:ways]
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.randint(0, ways, (query,), generator=gen)
    r = float(0.2 + 0.7 * torch.rand((), generator=gen)) if macs_ratio is None else macs_ratio
    return Episode(make_images(family, classes[sy], gen), sy, make_images(family, classes[qy], gen), qy, ways, r, family, classes.tolist())


def two_family_backbone(gen: torch.Generator) -> torch.nn.Module:
    """small_cnn (width 16) trained on both families' 12 classes (900 images each): it has channels
    for hue and for orientation, and a task of one family needs only its own."""
    labels = torch.arange(12).repeat(150)
    x = torch.cat([make_images("color", labels[:900] % 6, gen), make_images("orientation", labels[900:] % 6, gen)])
    y = torch.cat([labels[:900] % 6, 6 + labels[900:] % 6])
    backbone = build_backbone("small_cnn", 12, width=16)
    train_classifier(backbone, x, y, TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=False))
    return backbone


def held_out_task(family: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 6-way task never seen in meta-training: 20 training and 40 test images per class."""
    g = torch.Generator().manual_seed(seed)
    y_train, y_test = torch.arange(6).repeat_interleave(20), torch.arange(6).repeat_interleave(40)
    return make_images(family, y_train, g), y_train, make_images(family, y_test, g), y_test


def cross_evaluate(pruner: StampPruner, tasks: dict, summaries: dict, ratio: float) -> dict[str, dict[str, float]]:
    """Test accuracy (points) of each family's task pruned at ``ratio`` with its own summary's mask,
    the other family's and the mean summary's, after the same 2-epoch fine-tune (mean of 2
    fine-tune seeds). Equal masks are fine-tuned once."""
    mean = TaskSummary.mean([summaries[f] for f in FAMILIES])
    finetune = TrainConfig(epochs=2, batch_size=32, lr=0.02, augment=False)
    out: dict[str, dict[str, float]] = {}
    scored: dict[tuple[str, str], float] = {}
    for f, (x, y, xt, yt) in tasks.items():
        other = next(o for o in FAMILIES if o != f)
        out[f] = {}
        for label, summary in (("own", summaries[f]), ("other", summaries[other]), ("mean", mean)):
            spec = pruner.generate(x, y, macs_ratio=ratio, embedding=summary)
            key = (f, spec.to_json())
            if key not in scored:
                accs = [prune_and_finetune(pruner.backbone, spec, x, y, xt, yt, dataclasses.replace(finetune, seed=s)).accuracy
                        for s in range(2)]
                scored[key] = 100 * sum(accs) / len(accs)
            out[f][label] = scored[key]
    return out


def l1_accuracy(backbone: torch.nn.Module, tasks: dict, ratio: float) -> dict[str, float]:
    """Test accuracy (points) of each family's task with L1's mask at ``ratio``, after cross_evaluate's fine-tune."""
    from stamp_core import analyze_structure
    from stamp_core.baselines import select_spec
    from stamp_core.groups import score_l1

    structure = analyze_structure(backbone, (3, 32, 32))
    spec = select_spec(score_l1(backbone, structure), structure, backbone.config, ratio, normalize=True)
    finetune = TrainConfig(epochs=2, batch_size=32, lr=0.02, augment=False)
    return {f: 100 * sum(prune_and_finetune(backbone, spec, x, y, xt, yt, dataclasses.replace(finetune, seed=s)).accuracy
                         for s in range(2)) / 2 for f, (x, y, xt, yt) in tasks.items()}
