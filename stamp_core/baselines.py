"""Pruning baselines STAMP is measured against, on the same channel groups and MACs model.

Every scorer returns one 1-D float tensor per prunable group of a :class:`PrunableStructure`
(structure order, one value per channel; higher = keep). :func:`select_spec` turns any such scores
into a :class:`PruneSpec` at MACs ratio ``r`` with the same global-threshold calibration STAMP uses
(:func:`stamp_core.calibration.calibrate_masks`), so every method is held to exactly the same budget.

Scorers:

- :func:`score_uniform`: equal scores; calibration's tie-break (relative position in the group)
  then keeps the same fraction of every group, the largest that fits the budget (uniform width).
- :func:`score_random`: seeded random channels.
- :func:`score_l1`: torch-pruning's ``MagnitudeImportance(p=1)`` summed over each dependency group
  (the filter's weights, its norm's affine parameters and the consumers' input weights).
- :func:`score_snip`, :func:`score_grasp`, :func:`score_synflow`: the per-weight saliencies of
  SNIP (``|w * g|``), GraSP (``-w * Hg``, high = prune) and SynFlow (``|w * dR/dw|`` on the
  linearised net with all-ones input), summed per channel over every layer coupled in its group.
- :func:`train_beta_bernoulli_dropout`: Beta-Bernoulli dropout (Lee et al. 2018) on the target:
  per-channel Kumaraswamy posteriors trained with the network under a KL prior and a MACs penalty;
  the slow single-task method STAMP amortises.

Each method is registered under a name (:func:`register_criterion`, timm-style) with one signature,
``score(ScoringInput) -> scores``; :func:`spec_by_criterion` is the factory funnel the benchmark and
any other consumer use, and a miss lists what exists. A new criterion (or a deliberately bad one
in a test) is one decorated function.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from stamp_core.groups import ChannelGates, PrunableStructure, score_l1
from stamp_core.mask_generator import A_UC_INIT, B_UC_INIT, kl_kumaraswamy_beta, kumaraswamy_mean, kumaraswamy_sample, relaxed_bernoulli
from stamp_core.backbones import task_classes
from stamp_core.calibration import __version__, calibrate_masks, deployed_structure, spec_from_kept
from stamp_core.spec import PruneSpec

GroupScores = list[torch.Tensor]
_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)



# ----------------------------------------------------------------------------- selection


def select_spec(
    scores: Sequence[torch.Tensor],
    structure: PrunableStructure,
    backbone_config: dict[str, Any],
    macs_ratio: float,
    round_to: int = 1,
    normalize: bool = False,
    metadata: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> PruneSpec:
    """The PruneSpec keeping the globally best-scored channels whose real MACs are <= ``macs_ratio``.

    Args:
        scores: one tensor per group of ``structure`` (structure order), higher = keep.
        structure: the backbone's prunable groups and MACs model.
        backbone_config: ``Backbone.config`` of the network the spec will be applied to.
        macs_ratio: budget ``r`` in (0, 1].
        round_to: keep a multiple of this many channels per group.
        normalize: divide each group's scores by their mean absolute value first, so layers of
            different size and depth compete on relative importance (torch-pruning's "mean"
            normaliser); ties and signs are preserved.
        metadata: stored in the spec (e.g. the method name).
        num_classes: meet the budget, and count MACs and params, with a head of this many classes (the
            deployed net's); None: the backbone's own head.

    Raises:
        ValueError: wrong number or sizes of score tensors, non-finite scores, bad budget.
    """
    if not (isinstance(macs_ratio, (int, float)) and 0.0 < float(macs_ratio) <= 1.0):
        raise ValueError(f"macs_ratio={macs_ratio!r}: expected a number in (0, 1]")
    if len(scores) != structure.num_groups:
        raise ValueError(f"got scores for {len(scores)} groups: expected {structure.num_groups} (one per prunable group)")
    checked = []
    for g, s in zip(structure.groups, scores):
        s = torch.as_tensor(s).detach().double().flatten()
        if s.numel() != g.size:
            raise ValueError(f"group {g.name!r}: got {s.numel()} scores, expected {g.size} (one per channel)")
        if not torch.isfinite(s).all():
            raise ValueError(f"group {g.name!r}: scores contain NaN or inf; expected finite numbers")
        if normalize:
            s = s / s.abs().mean().clamp_min(1e-300)
        checked.append(s)
    deployed = deployed_structure(structure, num_classes)
    kept = calibrate_masks(checked, deployed, float(macs_ratio), round_to)
    return spec_from_kept(kept, deployed, backbone_config, float(macs_ratio), __version__, metadata)


# ----------------------------------------------------------------------------- data-free scorers


def score_uniform(structure: PrunableStructure) -> GroupScores:
    """Equal scores: with :func:`select_spec` every group keeps the same fraction (within a channel)."""
    return [torch.ones(g.size, dtype=torch.float64) for g in structure.groups]


def score_random(structure: PrunableStructure, seed: int) -> GroupScores:
    """Seeded uniform random scores (random channels, global threshold)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.rand(g.size, generator=gen, dtype=torch.float64) for g in structure.groups]


# ----------------------------------------------------------------------------- gradient saliencies


def per_channel_sum(model: nn.Module, structure: PrunableStructure, saliency: dict[str, torch.Tensor]) -> GroupScores:
    """Sum per-parameter saliencies per channel over every layer coupled in each group.

    A group's channel ``c`` owns: output row ``c`` (and bias ``c``) of every conv/linear writing
    the group, input column ``c`` of every conv/linear reading it, and entry ``c`` of the
    affine parameters of the group's norms. ``saliency`` maps parameter names to tensors shaped
    like the parameters; missing parameters count 0.
    """
    out = [torch.zeros(g.size, dtype=torch.float64) for g in structure.groups]

    def get(name: str) -> torch.Tensor | None:
        s = saliency.get(name)
        return None if s is None else s.detach().double()

    for layer in structure.layers:
        module = model.get_submodule(layer.name)
        w, b = get(f"{layer.name}.weight"), get(f"{layer.name}.bias")
        if layer.out_group >= 0:
            if w is not None:
                out[layer.out_group] += w.reshape(w.shape[0], -1).sum(1)
            if b is not None:
                out[layer.out_group] += b
        if layer.in_group >= 0 and w is not None:
            size = structure.groups[layer.in_group].size
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise NotImplementedError(f"{layer.name}: grouped convolutions are not supported by per-channel saliency sums")
            cols = w.transpose(0, 1).reshape(w.shape[1], -1).sum(1)  # (in_features,)
            # A linear layer after flatten sees each channel at several positions: fold them.
            out[layer.in_group] += cols.reshape(size, -1).sum(1)
    for gi, group in enumerate(structure.groups):
        for name in group.gate_modules:
            if isinstance(model.get_submodule(name), _NORMS):
                for p in ("weight", "bias"):
                    s = get(f"{name}.{p}")
                    if s is not None:
                        out[gi] += s
    return out


def _check_batch(x: torch.Tensor, y: torch.Tensor, model: nn.Module) -> None:
    if x.ndim != 4 or len(x) == 0 or len(x) != len(y):
        raise ValueError(f"expected a batch of images (N, C, H, W) and N labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    classes = getattr(getattr(model, "classifier", None), "out_features", None)
    if classes is not None and int(y.max()) >= classes:
        raise ValueError(
            f"labels go up to {int(y.max())} but the classifier has {classes} outputs: "
            "give the model a head for the target's classes first"
        )


def score_snip(model: nn.Module, structure: PrunableStructure, x: torch.Tensor, y: torch.Tensor) -> GroupScores:
    """SNIP connection sensitivity ``|w * dL/dw|`` on one batch, summed per channel group.

    ``model`` needs a classifier for the batch's classes; it is not modified (a copy is scored,
    in train mode so BatchNorm uses the batch's statistics).
    """
    _check_batch(x, y, model)
    net = copy.deepcopy(model).train()
    params = dict(net.named_parameters())
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    saliency = {n: (p * g).abs() for (n, p), g in zip(params.items(), grads) if g is not None}
    return per_channel_sum(net, structure, saliency)


def score_grasp(model: nn.Module, structure: PrunableStructure, x: torch.Tensor, y: torch.Tensor) -> GroupScores:
    """GraSP keep-scores ``w * Hg`` on one batch, summed per channel group.

    GraSP's saliency is ``-w * Hg`` and removes the weights with the *largest* saliency (those
    whose removal reduces gradient flow least); the returned scores are its negation, so as for
    every scorer here higher = keep. ``model`` is not modified.
    """
    _check_batch(x, y, model)
    net = copy.deepcopy(model).train()
    names, params = zip(*[(n, p) for n, p in net.named_parameters() if p.requires_grad])
    g = torch.autograd.grad(F.cross_entropy(net(x), y), params, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)]
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=True, allow_unused=True)
    z = sum((gi * gd).sum() for gi, gd in zip(grads, g) if gi is not None)
    hg = torch.autograd.grad(z, params, allow_unused=True)
    saliency = {n: (p * h).detach() for n, p, h in zip(names, params, hg) if h is not None}
    return per_channel_sum(net, structure, saliency)


def score_synflow(model: nn.Module, structure: PrunableStructure) -> GroupScores:
    """SynFlow ``|w * dR/dw|`` with ``R = sum(f_|w|(1))``, summed per channel group.

    Data-free: the copy's parameters are replaced by their absolute values, norms become fixed
    positive affine maps (running mean 0, variance 1, eval mode) and the input is all ones, in
    float64 so deep products do not overflow. ``model`` is not modified.
    """
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    params = dict(net.named_parameters())
    with torch.enable_grad():  # callers may be inside no_grad (e.g. StampPruner.generate)
        for p in params.values():
            p.requires_grad_(True)
        r = net(torch.ones(1, *structure.input_shape, dtype=torch.float64)).sum()
        grads = torch.autograd.grad(r, list(params.values()), allow_unused=True)
    saliency = {n: (p * g).abs() for (n, p), g in zip(params.items(), grads) if g is not None}
    return per_channel_sum(net, structure, saliency)


# ----------------------------------------------------------------------------- Beta-Bernoulli dropout


@dataclass
class BBDConfig:
    """Beta-Bernoulli dropout training on one target (Lee et al. 2018, channel-wise)."""

    epochs: int = 2  #: passes over the target's training images
    batch_size: int = 64
    lr: float = 0.01  #: SGD (momentum 0.9) rate of the network weights
    gate_lr: float = 0.05  #: Adam rate of the Kumaraswamy parameters
    kl_weight: float | None = None  #: gamma; None = 1 / number of training images
    macs_weight: float = 20.0  #: lambda of ``relu(E[MACs]/full - r)^2``
    prior_alpha: float = 1e-4  #: Beta(alpha, 1) prior
    temperature: float = 0.1  #: relaxed Bernoulli temperature
    seed: int = 0


@dataclass
class BBDResult:
    """Per-channel keep probabilities ``E[pi]`` (the scores), the training time and its log."""

    scores: GroupScores
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_beta_bernoulli_dropout(
    model: nn.Module,
    structure: PrunableStructure,
    x: torch.Tensor,
    y: torch.Tensor,
    macs_ratio: float,
    cfg: BBDConfig | None = None,
) -> BBDResult:
    """Train channel gates and ``model`` together on ``(x, y)``; ``model`` is updated in place.

    Each step samples one relaxed-Bernoulli gate per example and channel from Kumaraswamy
    posteriors (initialised as STAMP's base posterior) and minimises
    ``CE + kl_weight * KL(q || Beta(alpha, 1)) + macs_weight * relu(E[MACs]/full - r)^2``.
    The trained weights are the ones to prune: BBD prunes the network it trained.
    """
    cfg = cfg or BBDConfig()
    _check_batch(x, y, model)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"BBDConfig epochs={cfg.epochs}, batch_size={cfg.batch_size}: expected integers >= 1")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    a_uc = [nn.Parameter(torch.full((g.size,), A_UC_INIT)) for g in structure.groups]
    b_uc = [nn.Parameter(torch.full((g.size,), B_UC_INIT)) for g in structure.groups]
    opt_w = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    opt_g = torch.optim.Adam([*a_uc, *b_uc], lr=cfg.gate_lr)
    kl_weight = 1.0 / len(x) if cfg.kl_weight is None else cfg.kl_weight
    gates = ChannelGates(model, structure)
    history: list[dict[str, float]] = []
    model.train()
    try:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(x), generator=gen)
            totals = {"loss": 0.0, "ce": 0.0, "expected_macs_ratio": 0.0}
            steps = 0
            for i in range(0, len(x), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                params = [(F.softplus(a) + 1e-6, F.softplus(b) + 1e-6) for a, b in zip(a_uc, b_uc)]
                n = len(idx)
                z = [
                    relaxed_bernoulli(
                        kumaraswamy_sample(a.expand(n, -1), b.expand(n, -1), torch.rand(n, a.numel(), generator=gen)),
                        cfg.temperature, torch.rand(n, a.numel(), generator=gen),
                    )
                    for a, b in params
                ]
                with gates.apply(z):
                    ce = F.cross_entropy(model(x[idx]), y[idx])
                kl = sum(kl_kumaraswamy_beta(a, b, cfg.prior_alpha).sum() for a, b in params)
                keep = torch.stack([kumaraswamy_mean(a, b).sum() for a, b in params])
                ratio = structure.macs(keep).float() / structure.macs_full
                loss = ce + kl_weight * kl + cfg.macs_weight * F.relu(ratio - macs_ratio) ** 2
                opt_w.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_w.step()
                opt_g.step()
                totals["loss"] += float(loss.detach())
                totals["ce"] += float(ce.detach())
                totals["expected_macs_ratio"] += float(ratio.detach())
                steps += 1
            history.append({"epoch": epoch + 1, **{k: v / steps for k, v in totals.items()}})
    finally:
        gates.remove()
    model.eval()
    with torch.no_grad():
        scores = [kumaraswamy_mean(F.softplus(a) + 1e-6, F.softplus(b) + 1e-6).double() for a, b in zip(a_uc, b_uc)]
    return BBDResult(scores, time.perf_counter() - t0, history)


# ----------------------------------------------------------------------------- registry


@dataclass
class ScoringInput:
    """What a criterion may look at to score the channels of one task."""

    model: nn.Module  #: the weights to prune, with a prototype head for the task's classes
    structure: PrunableStructure  #: its prunable groups and MACs model
    x: torch.Tensor  #: the task's prepared training images
    y: torch.Tensor  #: their labels ``0..K-1``
    macs_ratio: float  #: the budget the mask is for
    seed: int = 0  #: seed of any randomness (random channels, batch choice, BBD)
    score_batch: int = 128  #: class-balanced images for one-batch criteria (SNIP, GraSP)
    bbd: BBDConfig | None = None  #: Beta-Bernoulli dropout settings (its seed is replaced by ``seed``)


@dataclass(frozen=True)
class Criterion:
    """A registered way to score channels."""

    name: str
    label: str  #: human-readable name for tables
    score: Callable[[ScoringInput], GroupScores]
    #: scores live on different scales per layer (weight counts, depth): divide each group's scores by
    #: their mean absolute value before one global threshold ranks them.
    normalize: bool = False
    #: trains ``model`` in place (BBD): the trained weights are the ones pruned, and the time counts.
    trains: bool = False


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, label: str, normalize: bool = False, trains: bool = False) -> Callable[[Callable[[ScoringInput], GroupScores]], Callable[[ScoringInput], GroupScores]]:
    """Decorator registering ``fn(ScoringInput) -> scores`` as criterion ``name`` (re-registering replaces it)."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"criterion name {name!r}: expected letters, digits and underscores")

    def add(fn: Callable[[ScoringInput], GroupScores]) -> Callable[[ScoringInput], GroupScores]:
        _CRITERIA[name] = Criterion(name, label, fn, normalize, trains)
        return fn

    return add


def unregister_criterion(name: str) -> None:
    """Remove a criterion (tests that plant one clean up with this)."""
    _CRITERIA.pop(name, None)


def list_criteria() -> list[str]:
    """Names of the registered criteria, in registration order."""
    return list(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``; ``ValueError`` listing what exists on a miss."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown pruning criterion {name!r}: expected one of {', '.join(_CRITERIA)}") from None


def spec_by_criterion(name: str, inp: ScoringInput, backbone_config: dict[str, Any], round_to: int = 1) -> PruneSpec:
    """Score with criterion ``name`` and calibrate to ``inp.macs_ratio`` (:func:`select_spec`) on the net the task
    deploys: the backbone with a head for ``inp.y``'s classes."""
    criterion = get_criterion(name)
    scores = criterion.score(inp)
    return select_spec(scores, inp.structure, backbone_config, inp.macs_ratio, round_to,
                       normalize=criterion.normalize, metadata={"method": name}, num_classes=task_classes(inp.y))


def _one_batch(inp: ScoringInput) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced batch of about ``score_batch`` images, seeded."""
    classes = torch.unique(inp.y)
    per_class = max(1, inp.score_batch // len(classes))
    gen = torch.Generator().manual_seed(inp.seed)
    picked = [idx[torch.randperm(len(idx), generator=gen)[:per_class]] for idx in (torch.nonzero(inp.y == c).flatten() for c in classes)]
    b = torch.sort(torch.cat(picked)).values
    return inp.x[b], inp.y[b]


@register_criterion("uniform", "uniform width")
def _uniform(inp: ScoringInput) -> GroupScores:
    return score_uniform(inp.structure)


@register_criterion("random", "random channels")
def _random(inp: ScoringInput) -> GroupScores:
    return score_random(inp.structure, inp.seed)


@register_criterion("l1", "L1 magnitude", normalize=True)
def _l1(inp: ScoringInput) -> GroupScores:
    return score_l1(inp.model, inp.structure)


@register_criterion("snip", "SNIP", normalize=True)
def _snip(inp: ScoringInput) -> GroupScores:
    return score_snip(inp.model, inp.structure, *_one_batch(inp))


@register_criterion("grasp", "GraSP", normalize=True)
def _grasp(inp: ScoringInput) -> GroupScores:
    return score_grasp(inp.model, inp.structure, *_one_batch(inp))


@register_criterion("synflow", "SynFlow", normalize=True)
def _synflow(inp: ScoringInput) -> GroupScores:
    return score_synflow(inp.model, inp.structure)


@register_criterion("bbd", "Beta-Bernoulli dropout", trains=True)
def _bbd(inp: ScoringInput) -> GroupScores:
    cfg = dataclasses.replace(inp.bbd or BBDConfig(), seed=inp.seed)
    return train_beta_bernoulli_dropout(inp.model, inp.structure, inp.x, inp.y, inp.macs_ratio, cfg).scores

