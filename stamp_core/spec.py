"""PruneSpec: which channels of which backbone to keep, as a small JSON document.

A spec is everything needed to rebuild a pruned architecture from the backbone's definition: apply
it to a freshly built backbone of the same kind and torch-pruning removes the other channels
physically. Weights then travel separately as a ``state_dict`` (loaded with ``weights_only=True``);
no module is ever pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

SPEC_VERSION = 1


class SpecMismatchError(ValueError):
    """A spec was applied to a model it was not made for."""


@dataclass
class PruneSpec:
    """Kept channel indices per prunable group of one backbone architecture."""

    backbone: dict[str, Any]  #: backbone config (``name``, ``in_channels``, ...; see Backbone.config)
    input_shape: tuple[int, int, int]  #: (C, H, W) the MACs below refer to
    kept: dict[str, list[int]]  #: group root name -> sorted kept channel indices
    group_sizes: dict[str, int]  #: group root name -> channels in the full network
    #: MACs of the full and the pruned net (one image) with the head the spec was calibrated for: the task's
    #: when the caller gave its class count (``stamp prune``, the benchmark), else ``backbone``'s own
    macs_full: int
    macs_pruned: int
    params_full: int = 0
    params_pruned: int = 0
    macs_ratio_target: float | None = None  #: the budget ``r`` the spec was generated for
    pruner_version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    spec_version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(v) for v in self.input_shape)  # type: ignore[assignment]
        if set(self.kept) != set(self.group_sizes):
            raise ValueError("spec.kept and spec.group_sizes must name the same groups")
        for name, idxs in self.kept.items():
            size = self.group_sizes[name]
            if not idxs:
                raise ValueError(f"group {name!r} keeps no channel: at least one must be kept")
            if sorted(set(idxs)) != list(idxs) or idxs[0] < 0 or idxs[-1] >= size:
                raise ValueError(
                    f"group {name!r}: kept indices must be sorted, unique and in [0, {size})"
                )

    @property
    def macs_ratio(self) -> float:
        """Real MACs of the pruned net over those of the full net."""
        return self.macs_pruned / self.macs_full

    def kept_counts(self) -> dict[str, int]:
        return {name: len(idxs) for name, idxs in self.kept.items()}

    def masks(self, group_names: list[str]) -> list[torch.Tensor]:
        """0/1 float masks in the order of ``group_names`` (for gating the full network)."""
        out = []
        for name in group_names:
            m = torch.zeros(self.group_sizes[name])
            m[self.kept[name]] = 1.0
            out.append(m)
        return out

    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`SpecMismatchError` unless ``model`` has the architecture of the spec."""
        config = getattr(model, "config", None)
        if not isinstance(config, dict):
            raise SpecMismatchError(
                f"model {type(model).__name__} has no backbone config: expected a model from "
                f"stamp_core.build_backbone({self.backbone['name']!r}, ...)"
            )
        mine = {k: v for k, v in self.backbone.items() if k != "num_classes"}
        theirs = {k: v for k, v in config.items() if k != "num_classes"}
        if mine != theirs:
            raise SpecMismatchError(f"spec is for backbone {mine}, but the model is {theirs}")
        for name, size in self.group_sizes.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise SpecMismatchError(f"spec group {name!r} is not a module of the model") from None
            out = getattr(module, "out_channels", getattr(module, "out_features", None))
            if out != size:
                raise SpecMismatchError(
                    f"group {name!r} has {out} channels in the model but {size} in the spec: "
                    "apply a spec to a freshly built, unpruned backbone"
                )

    def apply(self, model: nn.Module) -> nn.Module:
        """Physically remove the channels the spec does not keep; returns ``model`` (pruned in place).

        ``model`` must be a freshly built backbone of the spec's architecture; its class count may
        differ (the classifier's outputs are never pruned).
        """
        self.check_compatible(model)
        was_training = model.training
        model.eval()
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(1, *self.input_shape)
            )
        for name, idxs in self.kept.items():
            keep = set(idxs)
            removed = [i for i in range(self.group_sizes[name]) if i not in keep]
            if not removed:
                continue
            module = model.get_submodule(name)
            handler = graph.get_pruner_of_module(module).prune_out_channels
            graph.get_pruning_group(module, handler, idxs=removed).prune()
        model.train(was_training)
        return model

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneSpec":
        if not isinstance(d, dict):
            raise ValueError(f"a PruneSpec must be a JSON object, got {type(d).__name__}")
        version = d.get("spec_version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"spec_version {version} is not supported: expected {SPEC_VERSION}")
        required = {"backbone", "input_shape", "kept", "group_sizes", "macs_full", "macs_pruned"}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"PruneSpec JSON lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PruneSpec JSON has unknown fields {', '.join(unknown)}")
        d = dict(d)
        d["kept"] = {str(k): [int(i) for i in v] for k, v in d["kept"].items()}
        d["group_sizes"] = {str(k): int(v) for k, v in d["group_sizes"].items()}
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "PruneSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"PruneSpec is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename) so a crash never leaves a half-written spec."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json(indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "PruneSpec":
        return cls.from_json(Path(path).read_text())


def jaccard_distance(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """1 - |A n B| / |A u B| over (group, channel) pairs kept by two masks of the same backbone
    (``PruneSpec.kept``): 0 = the same channels, 1 = disjoint."""
    sa = {(g, i) for g, idx in a.items() for i in idx}
    sb = {(g, i) for g, idx in b.items() for i in idx}
    union = sa | sb
    return 1.0 - len(sa & sb) / len(union) if union else 0.0
