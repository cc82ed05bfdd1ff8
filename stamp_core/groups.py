"""Prunable channel groups, channel gates and the MACs cost model of a backbone.

:func:`analyze_structure` traces a backbone once with ``torch_pruning.DependencyGraph`` and returns a
:class:`PrunableStructure`: the channel groups that must be pruned together (a conv's outputs, its
BatchNorm, every residual addition that shares them and the consumers' inputs), where to put each
group's gate, and for every conv/linear layer which group its input and output channels belong to.

From that, MACs are an exact function of how many channels each group keeps
(:meth:`PrunableStructure.macs`), cheap enough to evaluate thousands of times while calibrating a
budget and differentiable for the meta-training penalty.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

_GATED_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)
_COSTED_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or removed together; one mask vector of length ``size``."""

    name: str  #: name of the group's root conv (stable id used in PruneSpec)
    size: int  #: number of channels
    gate_modules: tuple[str, ...]  #: modules whose outputs get multiplied by the gate
    norm_params_per_channel: int = 0  #: affine parameters of the group's norms per channel


@dataclass(frozen=True)
class LayerCost:
    """MACs of one conv/linear layer: ``coeff * c_in_kept * c_out_kept``."""

    name: str
    coeff: int  #: kernel area * output positions / conv groups
    c_in: int
    c_out: int
    in_group: int  #: index into ``groups`` or -1 when the input channels are fixed
    out_group: int  #: index into ``groups`` or -1 when the output channels are fixed
    weights_per_pair: int = 1  #: weights per (input, output) channel pair (kernel area / groups)
    bias: bool = False


class PrunableStructure:
    """The groups and cost model of one architecture at one input shape."""

    def __init__(
        self,
        groups: Sequence[ChannelGroup],
        layers: Sequence[LayerCost],
        input_shape: tuple[int, int, int],
        params_full: int | None = None,
    ) -> None:
        self.groups = list(groups)
        self.layers = list(layers)
        self.input_shape = tuple(input_shape)
        self.group_sizes = torch.tensor([g.size for g in self.groups], dtype=torch.float64)
        self._coeff = torch.tensor([l.coeff for l in self.layers], dtype=torch.float64)
        self._in_full = torch.tensor([l.c_in for l in self.layers], dtype=torch.float64)
        self._out_full = torch.tensor([l.c_out for l in self.layers], dtype=torch.float64)
        self._in_idx = torch.tensor([max(l.in_group, 0) for l in self.layers])
        self._out_idx = torch.tensor([max(l.out_group, 0) for l in self.layers])
        self._in_var = torch.tensor([l.in_group >= 0 for l in self.layers])
        self._out_var = torch.tensor([l.out_group >= 0 for l in self.layers])
        self._wpp = torch.tensor([l.weights_per_pair for l in self.layers], dtype=torch.float64)
        self._bias = torch.tensor([float(l.bias) for l in self.layers], dtype=torch.float64)
        self._norm_pc = torch.tensor([g.norm_params_per_channel for g in self.groups], dtype=torch.float64)
        self.macs_full = int(self.macs(self.group_sizes).item())
        variable_full = int(self._variable_params(self.group_sizes).item())
        # Parameters that no group scales (e.g. the classifier bias) are a constant offset.
        self._params_fixed = 0 if params_full is None else params_full - variable_full
        self.params_full = self._params_fixed + variable_full

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_channels(self) -> int:
        return int(self.group_sizes.sum().item())

    @property
    def device(self) -> torch.device:
        """Where the cost model's tensors live (the pruner's device: :class:`StampPruner` moves them)."""
        return self._coeff.device

    def to(self, device: torch.device | str) -> "PrunableStructure":
        """Move the cost model's tensors to ``device`` (dtypes kept: MACs are counted in float64)."""
        device = torch.device(device)
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(self, name, value.to(device))
        return self

    def macs(self, kept: torch.Tensor) -> torch.Tensor:
        """MACs when group ``g`` keeps ``kept[g]`` channels (float, differentiable, any dtype)."""
        c_in, c_out = self._in_out(kept)
        return (self._coeff * c_in * c_out).sum()

    def _in_out(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = kept.double()
        c_in = torch.where(self._in_var, kept[self._in_idx], self._in_full)
        c_out = torch.where(self._out_var, kept[self._out_idx], self._out_full)
        return c_in, c_out

    def _variable_params(self, kept: torch.Tensor) -> torch.Tensor:
        c_in, c_out = self._in_out(kept)
        return (self._wpp * c_in * c_out + self._bias * c_out).sum() + (self._norm_pc * kept.double()).sum()

    def params(self, kept: torch.Tensor) -> int:
        """Parameter count when group ``g`` keeps ``kept[g]`` channels."""
        return int(self._params_fixed + self._variable_params(kept).item())

    def channel_macs(self) -> list[float]:
        """Per group, the MACs one of its channels costs in the full network: the derivative of :meth:`macs` with
        respect to the group's width (the convs the group feeds as well as the ones that write it).

        Counted from the layers' cost terms at full width rather than by autograd, so it also works where
        gradients are off (``torch.inference_mode``, as the pruner generates)."""
        costs = [0.0] * self.num_groups
        for layer in self.layers:
            if layer.in_group >= 0:
                costs[layer.in_group] += layer.coeff * layer.c_out
            if layer.out_group >= 0:
                costs[layer.out_group] += layer.coeff * layer.c_in
        return costs

    def with_classifier_outputs(self, num_classes: int) -> "PrunableStructure":
        """The same structure with a ``num_classes``-way classifier: the cost of the net a task deploys, whose
        head is rebuilt for the task's classes, so a budget met here is met by the deployed net."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}: expected a positive integer")
        heads = [i for i, l in enumerate(self.layers) if l.name == "classifier"]
        if len(heads) != 1:
            raise ValueError(f"expected one layer named 'classifier' in the cost model, found {len(heads)}")
        layers = list(self.layers)
        layers[heads[0]] = replace(layers[heads[0]], c_out=num_classes)
        structure = PrunableStructure(self.groups, layers, self.input_shape)
        structure._params_fixed = self._params_fixed  # the fixed offset does not scale with the head
        structure.params_full = structure._params_fixed + int(structure._variable_params(structure.group_sizes).item())
        return structure.to(self.device)

    def signature(self) -> list[list]:
        """JSON-able description used to check a spec or pruner matches an architecture."""
        return [[g.name, g.size] for g in self.groups]


def analyze_structure(model: nn.Module, input_shape: tuple[int, int, int]) -> PrunableStructure:
    """Find the prunable groups of ``model`` (classifier outputs excluded) and its cost model.

    Args:
        model: a backbone with a ``classifier`` attribute (the layer whose outputs are never pruned).
        input_shape: ``(C, H, W)`` of one input image; MACs depend on it.
    """
    classifier = getattr(model, "classifier", None)
    ignored = [classifier] if isinstance(classifier, nn.Module) else []
    was_training = model.training
    model.eval()
    example = torch.zeros(1, *input_shape)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}

    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    raw: list[tuple[str, int, list[str], dict[str, str]]] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        root = group[0].dep.target.module
        size = len(group[0].idxs)
        norms: list[str] = []
        out_convs: list[str] = []
        roles: dict[str, str] = {}
        for item in group:
            module = item.dep.target.module
            if module not in names:  # functional ops (adds, reshapes) carry no parameters
                continue
            if list(item.root_idxs) != list(item.idxs):
                raise NotImplementedError(
                    f"group of {names[root]!r} maps channels non-trivially (concat/split); "
                    "STAMP supports architectures whose coupled layers share channel indices"
                )
            name = names[module]
            if isinstance(module, _GATED_NORMS):
                norms.append(name)
            elif isinstance(module, _COSTED_LAYERS):
                is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
                roles[name] = "out" if is_out else "in"
                if is_out:
                    out_convs.append(name)
        # Gate after the norm when there is one, so a zero gate also zeroes the norm's bias.
        gates = norms if norms else out_convs
        norm_params = sum(
            2 for n in set(norms) if getattr(model.get_submodule(n), "weight", None) is not None
        )
        raw.append((names[root], size, sorted(set(gates), key=order.get), roles, norm_params))

    raw.sort(key=lambda r: order[r[0]])
    groups = [ChannelGroup(name, size, tuple(gates), norm_p) for name, size, gates, _, norm_p in raw]
    in_group: dict[str, int] = {}
    out_group: dict[str, int] = {}
    for gi, (_, _, _, roles, _) in enumerate(raw):
        for name, role in roles.items():
            (out_group if role == "out" else in_group)[name] = gi

    layers = _trace_layer_costs(model, example, names, in_group, out_group)
    model.train(was_training)
    params_full = sum(p.numel() for p in model.parameters())
    return PrunableStructure(groups, layers, input_shape, params_full)


def _trace_layer_costs(
    model: nn.Module,
    example: torch.Tensor,
    names: dict[nn.Module, str],
    in_group: dict[str, int],
    out_group: dict[str, int],
) -> list[LayerCost]:
    costs: list[LayerCost] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        name = names[module]
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            positions = output.shape[-1] * output.shape[-2]
            coeff = k * positions // module.groups
            wpp = k // module.groups
            c_in, c_out = module.in_channels, module.out_channels
        else:
            coeff = int(output.numel() // output.shape[-1])  # rows per sample
            wpp = 1
            c_in, c_out = module.in_features, module.out_features
        costs.append(
            LayerCost(name, coeff, c_in, c_out, in_group.get(name, -1), out_group.get(name, -1),
                      wpp, module.bias is not None)
        )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COSTED_LAYERS)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return costs


def count_macs_params(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass of one image, and the parameter count.

    MACs are those of conv and linear layers (``k*k*C_in*C_out*H_out*W_out / groups`` and
    ``in*out``), the usual meaning of the figures quoted for CIFAR networks; norms, activations
    and poolings are elementwise and left out.

    Why not ``torch_pruning.utils.count_ops_and_params``: its parameter count is the same and its
    conv + linear MACs are ours plus the classifier's bias additions, but its total also counts the
    elementwise layers; the MAC budget of a spec (:meth:`PrunableStructure` group costs) counts
    exactly the products counted here, so a pruned model's count equals ``spec.macs_pruned``.
    tests/stamp_core/test_groups.py checks the agreement on every registered backbone.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape={tuple(input_shape)}: expected (C, H, W) of one image")
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += k * module.in_channels * output.numel() // module.groups
        else:
            total += module.in_features * output.numel()

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COSTED_LAYERS)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return int(total), int(params)


class ChannelGates:
    """Forward hooks that multiply every gated module's output by its group's gate.

    With a hard 0/1 gate the gated net computes exactly what the physically pruned net computes,
    because the gate sits after the norm (a removed channel contributes neither weight nor bias).
    Gates are ``(C,)`` (one mask for the batch) or ``(N, C)`` (one per sample).
    """

    def __init__(self, model: nn.Module, structure: PrunableStructure) -> None:
        self._gates: list[torch.Tensor] | None = None
        self._handles = []
        for gi, group in enumerate(structure.groups):
            for name in group.gate_modules:
                module = model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._make_hook(gi)))

    def _make_hook(self, gi: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            if self._gates is None:
                return out
            z = self._gates[gi]
            shape = [z.shape[0] if z.ndim == 2 else 1, -1] + [1] * (out.ndim - 2)
            return out * z.reshape(shape).to(out.dtype)

        return hook

    @contextlib.contextmanager
    def apply(self, gates: Sequence[torch.Tensor] | None) -> Iterator[None]:
        """Run the model with ``gates`` (one tensor per group) inside the block."""
        previous = self._gates
        self._gates = list(gates) if gates is not None else None
        try:
            yield
        finally:
            self._gates = previous

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def score_l1(model: nn.Module, structure: PrunableStructure) -> list[torch.Tensor]:
    """torch-pruning ``MagnitudeImportance(p=1)`` summed over each dependency group (no normaliser).

    ``model`` must be the network ``structure`` was analysed from (same module names).
    """
    names = {m: n for n, m in model.named_modules()}
    classifier = getattr(model, "classifier", None)
    ignored = [classifier] if isinstance(classifier, nn.Module) else []
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *structure.input_shape))
        importance = tp.importance.MagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
        found: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
                found[names[group[0].dep.target.module]] = importance(group).detach().double().cpu()
    finally:
        model.train(was_training)
    missing = [g.name for g in structure.groups if g.name not in found]
    if missing:
        raise ValueError(f"model has no dependency group rooted at {missing[:3]}: pass the network the structure was built from")
    return [found[g.name] for g in structure.groups]
