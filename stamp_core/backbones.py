"""Backbone registry: CIFAR-style CNNs that STAMP prunes.

Every backbone exposes the same small surface, which the rest of ``stamp_core`` relies on:

* ``features(x)`` -> pooled penultimate features ``(N, feature_dim)``;
* ``classifier`` -> the final ``nn.Linear`` (never pruned; replaced per task);
* ``forward(x) == classifier(features(x))``;
* ``name`` and ``config`` so a :class:`~stamp_core.spec.PruneSpec` can check it is applied to the
  architecture it was made for.

Every conv is followed by a BatchNorm, so channel gates go after the norms (see ``groups.py``).
Residual shortcuts that change shape use a 1x1 conv + BN projection (option B): torch-pruning can
trace it, unlike option A's zero padding.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

#: Smallest input side every registered backbone accepts (five 2x poolings of VGG need 28 px).
MIN_IMAGE_SIZE = 28


class Backbone(nn.Module):
    """Base class: a feature extractor plus a linear classifier."""

    name: str = "backbone"
    feature_dim: int
    classifier: nn.Linear

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: expected a positive class count")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels}: expected a positive channel count")
        self.config = {"name": self.name, "num_classes": num_classes, "in_channels": in_channels}

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` outputs (timm's verb)."""
        self.classifier = nn.Linear(self.classifier.in_features, num_classes)
        self.config = {**self.config, "num_classes": num_classes}


def task_classes(labels: torch.Tensor) -> int:
    """The head a task's labels ``0..K-1`` need: ``K = max + 1`` outputs (a class absent from a sample still
    gets its output). Every deployed net's classifier, and every budget met on it, uses this count."""
    if labels.numel() == 0:
        raise ValueError("task_classes: got no labels; expected class ids 0..K-1")
    return int(labels.max()) + 1


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class SmallCNN(Backbone):
    """Five conv layers, two poolings: fast enough for tests and the 2-core demo."""

    name = "small_cnn"

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__(num_classes, in_channels)
        w = width
        self.config["width"] = width
        self.body = nn.Sequential(
            *_conv_bn(in_channels, w), nn.ReLU(inplace=True),
            *_conv_bn(w, w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), nn.ReLU(inplace=True),
            *_conv_bn(2 * w, 2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)


_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(Backbone):
    """CIFAR VGG with BatchNorm and a single linear classifier (512 -> classes).

    The last pooling is adaptive so 28 px inputs work (28 -> 14 -> 7 -> 3 -> 1 -> 1).
    """

    def __init__(self, depth_name: str, num_classes: int, in_channels: int = 3) -> None:
        self.name = depth_name
        super().__init__(num_classes, in_channels)
        layers: list[nn.Module] = []
        c_in = in_channels
        cfg = _VGG_CFGS[depth_name]
        for i, v in enumerate(cfg):
            if v == "M":
                last = i == len(cfg) - 1
                layers.append(nn.AdaptiveMaxPool2d(1) if last else nn.MaxPool2d(2))
            else:
                layers += [*_conv_bn(c_in, int(v)), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.body = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut projects with 1x1 conv + BN when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(Backbone):
    """CIFAR ResNet: 3x3 stem, no max-pool, stages of basic blocks, global average pooling."""

    def __init__(
        self,
        depth_name: str,
        num_classes: int,
        in_channels: int,
        blocks: list[int],
        widths: list[int],
    ) -> None:
        self.name = depth_name
        super().__init__(num_classes, in_channels)
        self.conv1, self.bn1 = _conv_bn(in_channels, widths[0], 3, 1)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c_in, w, stride if j == 0 else 1))
                c_in = w
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return torch.flatten(self.pool(self.layers(x)), 1)


_BackboneFactory = Callable[..., Backbone]

_REGISTRY: dict[str, _BackboneFactory] = {
    "small_cnn": lambda num_classes, in_channels=3, **kw: SmallCNN(num_classes, in_channels, **kw),
    "vgg11": lambda num_classes, in_channels=3: VGG("vgg11", num_classes, in_channels),
    "vgg16": lambda num_classes, in_channels=3: VGG("vgg16", num_classes, in_channels),
    "vgg19": lambda num_classes, in_channels=3: VGG("vgg19", num_classes, in_channels),
    "resnet20": lambda num_classes, in_channels=3: ResNet(
        "resnet20", num_classes, in_channels, [3, 3, 3], [16, 32, 64]),
    "resnet56": lambda num_classes, in_channels=3: ResNet(
        "resnet56", num_classes, in_channels, [9, 9, 9], [16, 32, 64]),
    "resnet18": lambda num_classes, in_channels=3: ResNet(
        "resnet18", num_classes, in_channels, [2, 2, 2, 2], [64, 128, 256, 512]),
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_REGISTRY)


def build_backbone(name: str, num_classes: int, in_channels: int = 3, **kwargs: int) -> Backbone:
    """Build a registered backbone with freshly initialised weights.

    Args:
        name: one of :func:`list_backbones`.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images (3; grayscale data is repeated to 3).
        **kwargs: backbone-specific options (``small_cnn``: ``width``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(list_backbones())}")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def build_backbone_from_config(config: dict) -> Backbone:
    """Inverse of ``backbone.config``: rebuild the same architecture."""
    cfg = dict(config)
    name = cfg.pop("name")
    return build_backbone(name, **cfg)
