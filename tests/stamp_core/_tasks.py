"""Two families of synthetic tasks that need different features, for stamp_core tests.

``color`` tasks: classes differ only by hue of a noisy patch (texture is random).
``orientation`` tasks: grayscale gratings whose classes differ only by orientation (colour is random
brightness). A pruner that adapts to the task should keep different channels for the two.
"""

from __future__ import annotations

import math

import torch

from stamp_core.meta import Episode

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
