"""One STAMP meta-training step on a meta-batch of episodes (small classification tasks with budgets).

Loss per episode (DESIGN.md section 2)::

    CE(f(x; theta, z), y) + kl_weight * sum KL(q(pi) || Beta(alpha, 1))
                          + macs_weight * relu(E[MACs(z)] / MACs_full - r) ** 2

``z`` are relaxed-Bernoulli gates drawn from the generator's Kumaraswamy posteriors; the task head
is a cosine classifier initialised from the class prototypes of the gated backbone's features.
With ``inner_steps > 0`` a copy of the backbone and head take a few SGD steps on one half of the
training batch and the loss on the other half is back-propagated first-order (FOMAML).
A step averages the loss over a meta-batch whose task embeddings the generator standardises
against each other (``task_norm="batch"``); gated passes never touch BatchNorm's running statistics.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stamp_core.channel_generator import TaskSummary
from stamp_core.mask_generator import kl_kumaraswamy_beta, kumaraswamy_mean, kumaraswamy_sample, relaxed_bernoulli
from stamp_core.pruner import StampPruner, calibrate_masks


@dataclass
class Episode:
    """One meta-learning task: a set for the encoder, a disjoint training batch and a budget."""

    support_x: torch.Tensor  #: (S, C, H, W) prepared images, class-balanced
    support_y: torch.Tensor  #: (S,) int64 in 0..K-1
    query_x: torch.Tensor  #: (B, C, H, W) training batch, disjoint from the support set
    query_y: torch.Tensor  #: (B,) int64 in 0..K-1
    num_classes: int  #: K
    macs_ratio: float  #: target budget r
    dataset: str = ""  #: source dataset name (for logging)
    classes: list[int] = field(default_factory=list)  #: original class ids in relabelled order

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(self.support_x.to(device), self.support_y.to(device), self.query_x.to(device),
                       self.query_y.to(device), self.num_classes, self.macs_ratio, self.dataset, self.classes)


BUDGET_PENALTIES = ("two_sided", "upper")
OBJECTIVES = ("relaxed", "deployed")
DEPLOYED_GRADIENTS = ("plain", "budget_neutral", "layer_es")
PRECISIONS = ("fp32", "bf16")


@dataclass
class MetaConfig:
    """Loss weights and options of meta-training."""

    kl_weight: float = 1e-4  #: gamma; ~1/N for source tasks of N images
    macs_weight: float = 20.0  #: lambda of the budget penalty
    head_scale: float = 10.0  #: temperature of the cosine task head
    inner_steps: int = 0  #: first-order inner-loop SGD steps (0 = off)
    inner_lr: float = 0.01  #: inner-loop learning rate
    label_free_prob: float = 0.0  #: chance of encoding an episode without labels
    #: "two_sided" penalises any gap between expected and target MACs ratio, so the masks seen in
    #: training have the budget they will be calibrated to at test time; "upper" is the paper's
    #: relu(E[MACs]/full - r)^2, under which the KL term alone decides how far below r to go.
    budget_penalty: str = "two_sided"
    #: "relaxed" (v1): CE of sampled relaxed-Bernoulli masks on the query batch + KL + budget penalty.
    #: "deployed" (v2): the budget-calibrated hard mask that generate() would return, the pruned
    #: net's prototype head fine-tuned for ``inner_steps`` on the support set, CE on the query
    #: batch; gradients reach the scores straight through the hard gates.
    objective: str = "relaxed"
    #: "deployed" only: add the budget penalty on the keep probabilities' expected MACs (reported
    #: as ``soft_macs_ratio`` either way). Under evaluation: it stops the probabilities drifting to
    #: 1 at small budgets (a suite-trained channel pruner without it starved residual streams at
    #: r=0.1), but on the two-family cross-evaluation it cost adaptivity (see _deployed_loss).
    deployed_macs_penalty: bool = False
    #: "deployed" only: how the straight-through gradient reaches the keep probabilities. "plain":
    #: ``dCE/dz`` as is; "budget_neutral": minus ``lambda * dMACs/dz`` with ``lambda`` chosen per
    #: episode so that raising every channel's probability together gets no gradient (the
    #: calibration ignores such a shift); each channel is charged its marginal MACs.
    #: "layer_es": no straight-through gradient; antithetic evolution strategies on one logit shift
    #: per layer (``es_pairs`` pairs of +-``es_sigma`` shifts, each mask calibrated and scored like
    #: the unperturbed one), i.e. the gradient of the deployed loss with respect to how many channels
    #: each layer keeps. It sees what first-order gradients cannot: emptying a layer is catastrophic.
    deployed_gradient: str = "plain"
    es_pairs: int = 4  #: "layer_es": antithetic pairs of per-layer shifts per episode
    es_sigma: float = 0.5  #: "layer_es": standard deviation of a layer's logit shift
    #: "bf16": the meta-batch loss runs under ``torch.autocast(bfloat16)`` on the pruner's device
    #: (convolutions and matmuls in bf16; weights, gradients and the optimizer stay float32);
    #: "fp32": no autocast.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.budget_penalty not in BUDGET_PENALTIES:
            raise ValueError(f"budget_penalty={self.budget_penalty!r}: expected 'two_sided' or 'upper'")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.deployed_gradient not in DEPLOYED_GRADIENTS:
            raise ValueError(f"deployed_gradient={self.deployed_gradient!r}: expected one of {', '.join(DEPLOYED_GRADIENTS)}")
        if self.es_pairs < 1 or not self.es_sigma > 0:
            raise ValueError(f"es_pairs={self.es_pairs}, es_sigma={self.es_sigma}: expected at least one pair and sigma > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise with batch statistics inside the block but leave every running statistic as it was.

    Gated training passes see masked activations: letting them update BatchNorm's running
    statistics corrupted what the set encoder reads in eval mode and what pruned nets inherit
    (after 80 resnet20 episodes the eval-mode feature norm was 53.4 against 11.1 with batch
    statistics). Momentum 0 keeps ``running = (1 - 0) * running`` bit for bit; copies made inside
    the block (the inner loop's fast weights) inherit it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def prototype_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Normalised class means ``(K, D)`` of ``features``: the initial task head."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1)
    return F.normalize(sums / counts, dim=1)


def _cosine_logits(features: torch.Tensor, head: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(features, dim=1) @ F.normalize(head, dim=1).T


def sample_gates(pruner: StampPruner, params: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[torch.Tensor]:
    """One relaxed-Bernoulli gate vector per example: ``(n, C)`` per group.

    Sampling per example (as Beta-Bernoulli dropout does) averages the mask's gradient estimate
    over the batch; a single mask per batch gave gradients too noisy for the generator to learn
    task-specific masks in our runs.
    """
    temperature = pruner.config.temperature
    return [relaxed_bernoulli(kumaraswamy_sample(a.expand(n, -1), b.expand(n, -1)), temperature) for a, b in params]


def task_summary(pruner: StampPruner, episode: Episode, cfg: MetaConfig) -> TaskSummary:
    """What the generator reads of the episode's support set (label-free with ``label_free_prob``)."""
    use_labels = cfg.label_free_prob <= 0 or torch.rand(()) >= cfg.label_free_prob
    return pruner.summarize(episode.support_x, episode.support_y if use_labels else None)


def episode_loss(
    pruner: StampPruner,
    episode: Episode,
    cfg: MetaConfig,
    params: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, float], nn.Module | None]:
    """Loss of one episode, its parts, and the adapted backbone copy (None without inner loop).

    Gradients reach encoder, generator and backbone. With ``cfg.inner_steps > 0`` the loss is that
    of an adapted *copy* of the backbone: pass it to :func:`apply_first_order_grads` after
    ``backward()`` (``meta_train_step`` does).

    Args:
        params: the generator's posteriors for this episode (:func:`meta_batch_loss` computes them
            for a whole meta-batch); computed from the episode alone when omitted.
    """
    k = episode.num_classes
    if params is None:
        summary = task_summary(pruner, episode, cfg)
        params = pruner.generator(summary.embedding, episode.macs_ratio, summary.channel_stats)
    if cfg.objective == "deployed":
        return _deployed_loss(pruner, episode, cfg, params)

    net = pruner.backbone
    net.train()
    with frozen_norm_statistics(net):
        with torch.no_grad(), pruner.gates.apply([kumaraswamy_mean(a, b) for a, b in params]):
            head_init = prototype_head(net.features(episode.support_x), episode.support_y, k)
        head = head_init.clone().requires_grad_(True)

        qx, qy = episode.query_x, episode.query_y
        if cfg.inner_steps > 0:
            net, head, qx, qy = _inner_adapt(pruner, net, head, params, qx, qy, cfg)
        gates = sample_gates(pruner, params, len(qx))
        with pruner.gates.apply(gates):
            logits = _cosine_logits(net.features(qx), head, cfg.head_scale)
    ce = F.cross_entropy(logits, qy)

    kl = sum(kl_kumaraswamy_beta(a, b, pruner.config.prior_alpha).sum() for a, b in params)
    penalty, ratio = _budget_penalty(pruner, [kumaraswamy_mean(a, b) for a, b in params], episode.macs_ratio, cfg)
    loss = ce + cfg.kl_weight * kl + cfg.macs_weight * penalty
    parts = {
        "loss": float(loss.detach()),
        "ce": float(ce.detach()),
        "kl": float(kl.detach()),
        "macs_penalty": float(penalty.detach()),
        "expected_macs_ratio": float(ratio.detach()),
        "target_macs_ratio": float(episode.macs_ratio),
        "accuracy": float((logits.argmax(1) == qy).float().mean()),
    }
    return loss, parts, (net if net is not pruner.backbone else None)


def hard_gates(pruner: StampPruner, probs: Sequence[torch.Tensor], macs_ratio: float,
               like: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """0/1 gates of the mask ``generate`` would return for these keep probabilities (or any scores
    ranked the same way) and budget; ``like``: tensors whose dtype and device the gates take."""
    kept = calibrate_masks([p.detach().cpu() for p in probs], pruner.structure, macs_ratio)
    gates = []
    for p, idx in zip(like if like is not None else probs, kept):
        z = torch.zeros_like(p)
        z[torch.as_tensor(idx, dtype=torch.long, device=p.device)] = 1.0
        gates.append(z)
    return gates


def _deployed_loss(
    pruner: StampPruner, episode: Episode, cfg: MetaConfig, params: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, float], nn.Module | None]:
    """Query CE of the deployed mask after a short fine-tune of the pruned net (first-order).

    The forward pass uses exactly the calibrated hard mask (so the budget always holds and the
    ranking is all the generator decides); the backward pass treats a gate as ``pi``, so a
    channel's score moves by ``dCE/dz``, the first-order effect of keeping it, which is informative
    for removed channels too (their activations are computed, then zeroed).

    ``dCE/dz`` says "keep more" for nearly every channel, and the calibration ignores a shift of all
    scores, so without a counter-force the probabilities drift to 1 wherever budgets are small:
    after 1,200 suite episodes every keep probability was 0.85-0.99 at r=0.1, the ranking was decided
    in the saturated tail, and the masks starved the residual streams to one channel (sklearn
    digits at r=0.1: 11% after fine-tuning). ``cfg.deployed_macs_penalty`` adds the budget penalty
    on the probabilities' expected MACs (as in the relaxed objective), which pins their scale to the
    budget and charges each channel its cost; on the two-family cross-evaluation (100 episodes,
    r=0.1) it lowered own − mean from +18.6 to +1.0 points, so it is off by default until a suite
    benchmark decides.
    """
    probs = [kumaraswamy_mean(a, b) for a, b in params]
    if cfg.deployed_gradient == "layer_es":
        ce, accuracy, hard = layer_es_surrogate(pruner, episode, cfg, probs)
        net = pruner.backbone
    else:
        hard = hard_gates(pruner, probs, episode.macs_ratio)
        through = budget_neutral_gradient(pruner, probs, hard) if cfg.deployed_gradient == "budget_neutral" else probs
        straight = [z + p - p.detach() for z, p in zip(hard, through)]
        net = pruner.backbone
        net.train()
        with frozen_norm_statistics(net):
            net, head = _adapt_masked(pruner, hard, episode, cfg)
            with pruner.gates.apply(straight):
                logits = _cosine_logits(net.features(episode.query_x), head, cfg.head_scale)
        ce = F.cross_entropy(logits, episode.query_y)
        accuracy = float((logits.argmax(1) == episode.query_y).float().mean())
    kept = torch.stack([z.sum() for z in hard])
    ratio = pruner.structure.macs(kept.to(pruner.structure.device)).float() / pruner.structure.macs_full
    penalty, soft_ratio = _budget_penalty(pruner, probs, episode.macs_ratio, cfg)
    loss = ce + cfg.macs_weight * penalty if cfg.deployed_macs_penalty else ce
    parts = {
        "loss": float(loss.detach()),
        "ce": float(ce.detach()),
        "kl": 0.0,
        "macs_penalty": float(penalty.detach()),
        "expected_macs_ratio": float(ratio),
        "soft_macs_ratio": float(soft_ratio.detach()),
        "target_macs_ratio": float(episode.macs_ratio),
        "accuracy": accuracy,
    }
    return loss, parts, (net if net is not pruner.backbone else None)


def _adapt_masked(pruner: StampPruner, hard: Sequence[torch.Tensor], episode: Episode, cfg: MetaConfig
                  ) -> tuple[nn.Module, torch.Tensor]:
    """The backbone (a fine-tuned copy when ``cfg.inner_steps``) and the prototype head of the pruned net.

    Call inside :func:`frozen_norm_statistics` with the backbone in train mode.
    """
    net = pruner.backbone
    with torch.no_grad(), pruner.gates.apply(hard):
        head = prototype_head(net.features(episode.support_x), episode.support_y, episode.num_classes)
    if cfg.inner_steps > 0:
        net = copy.deepcopy(net)  # the gate hooks are shared functions, so the copy is gated too
        head = head.clone().requires_grad_(True)
        opt = torch.optim.SGD([*net.parameters(), head], lr=cfg.inner_lr, momentum=0.9)
        for _ in range(cfg.inner_steps):
            with pruner.gates.apply(hard):
                inner = F.cross_entropy(_cosine_logits(net.features(episode.support_x), head, cfg.head_scale),
                                        episode.support_y)
            opt.zero_grad()
            inner.backward()
            opt.step()
        head = head.detach()
    return net, head


def _masked_query_ce(pruner: StampPruner, hard: Sequence[torch.Tensor], episode: Episode, cfg: MetaConfig
                     ) -> tuple[float, float]:
    """Query CE and accuracy of the pruned net after the inner fine-tune; no gradient leaves."""
    net = pruner.backbone
    was_training = net.training
    net.train()
    try:
        with frozen_norm_statistics(net):
            net, head = _adapt_masked(pruner, hard, episode, cfg)
            with torch.no_grad(), pruner.gates.apply(hard):
                logits = _cosine_logits(net.features(episode.query_x), head, cfg.head_scale)
    finally:
        pruner.backbone.train(was_training)
    return float(F.cross_entropy(logits, episode.query_y)), float((logits.argmax(1) == episode.query_y).float().mean())


def layer_es_surrogate(pruner: StampPruner, episode: Episode, cfg: MetaConfig, probs: Sequence[torch.Tensor]
                        ) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
    """Antithetic ES on per-layer shifts of the keep logits; returns (surrogate, accuracy, unperturbed mask).

    The surrogate's value is the mean query CE of the perturbed masks; its gradient with respect to
    every logit of layer ``g`` is the ES estimate of ``dCE/d shift_g`` shared over the layer's
    channels, so training moves how many channels each layer keeps and leaves the ranking inside a
    layer to the base scores. Both masks of a pair see the same episode and inner steps (common random
    numbers), so their difference is the mask's effect alone.
    """
    # clamped for the value only: a saturated layer keeps its gradient and can be grown back
    logits = [torch.logit(p + (p.clamp(1e-6, 1 - 1e-6) - p).detach()) for p in probs]
    shifts = torch.randn(cfg.es_pairs, len(logits), dtype=torch.float64)
    grad = torch.zeros(len(logits), dtype=torch.float64)
    ces, accs = [], []
    for u in shifts:
        pair = []
        for sign in (1.0, -1.0):
            scores = [(l.detach().double().cpu() + sign * cfg.es_sigma * float(u[g])) for g, l in enumerate(logits)]
            ce, acc = _masked_query_ce(pruner, hard_gates(pruner, scores, episode.macs_ratio, like=probs), episode, cfg)
            pair.append(ce)
            ces.append(ce)
            accs.append(acc)
        grad += (pair[0] - pair[1]) * u / (2.0 * cfg.es_sigma * cfg.es_pairs)
    surrogate = sum((l * (float(grad[g]) / len(l))).sum() for g, l in enumerate(logits))
    value = torch.as_tensor(float(np.mean(ces)), dtype=surrogate.dtype, device=surrogate.device)
    return surrogate - surrogate.detach() + value, float(np.mean(accs)), hard_gates(pruner, probs, episode.macs_ratio)


def budget_neutral_gradient(pruner: StampPruner, probs: Sequence[torch.Tensor], hard: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``probs`` whose gradient ``g`` becomes ``g - lambda * m``: ``m`` is each channel's marginal
    MACs at the hard mask, ``lambda = sum(g) / sum(m)``, so a common shift of every probability (which
    the calibration ignores) gets no gradient, and a channel gains score only where its first-order
    benefit per MAC beats the episode's average."""
    counts = torch.stack([z.detach().sum() for z in hard]).to(pruner.structure.device).double().requires_grad_(True)
    (per_group,) = torch.autograd.grad(pruner.structure.macs(counts), counts)
    flat = torch.cat(list(probs))
    m = torch.cat([per_group[g].expand(len(p)) for g, p in enumerate(probs)]).to(flat.device, flat.dtype)
    m = m / m.mean().clamp_min(1e-12)
    if flat.requires_grad:
        flat.register_hook(lambda g: g - (g.sum() / m.sum()) * m)
    return list(flat.split([len(p) for p in probs]))


def _budget_penalty(pruner: StampPruner, probs: Sequence[torch.Tensor], macs_ratio: float,
                    cfg: MetaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``gap**2`` (two-sided) or ``relu(gap)**2`` of the keep probabilities' expected MACs ratio."""
    expected_keep = torch.stack([p.sum() for p in probs])
    ratio = pruner.structure.macs(expected_keep).float() / pruner.structure.macs_full
    gap = ratio - macs_ratio
    return (gap**2 if cfg.budget_penalty == "two_sided" else F.relu(gap) ** 2), ratio


def meta_batch_loss(
    pruner: StampPruner, episodes: Sequence[Episode], cfg: MetaConfig
) -> tuple[torch.Tensor, dict[str, float], list[nn.Module]]:
    """Mean loss over a meta-batch, mean parts, and the adapted backbone copies.

    The tasks' embeddings go through the generator together, so with ``task_norm="batch"`` each is
    measured against the others (that needs at least two episodes).
    """
    if not episodes:
        raise ValueError("a meta-batch needs at least one episode")
    if pruner.generator.task_norm == "batch" and pruner.generator.training and len(episodes) < 2:
        raise ValueError(
            f"task_norm='batch' standardises task embeddings across a meta-batch: got {len(episodes)} "
            "episode(s), expected at least 2 (episodes.per_step in the meta-train config)"
        )
    batch = TaskSummary.stack([task_summary(pruner, ep, cfg) for ep in episodes])
    ratios = torch.tensor([ep.macs_ratio for ep in episodes], dtype=batch.embedding.dtype, device=batch.embedding.device)
    batch_params = pruner.generator(batch.embedding, ratios, batch.channel_stats)
    total = torch.zeros((), device=batch.embedding.device)
    sums: dict[str, float] = {}
    adapted = []
    for i, ep in enumerate(episodes):
        loss, parts, net = episode_loss(pruner, ep, cfg, [(a[i], b[i]) for a, b in batch_params])
        total = total + loss / len(episodes)
        for key, v in parts.items():
            sums[key] = sums.get(key, 0.0) + v / len(episodes)
        if net is not None:
            adapted.append(net)
    return total, sums, adapted


def _inner_adapt(
    pruner: StampPruner,
    net: nn.Module,
    head: torch.Tensor,
    params: list[tuple[torch.Tensor, torch.Tensor]],
    qx: torch.Tensor,
    qy: torch.Tensor,
    cfg: MetaConfig,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGD on a copy of backbone + head with fixed gates, on the first half of the batch."""
    half = max(1, len(qx) // 2)
    fast = copy.deepcopy(net)  # the gate hooks are shared functions, so the copy is gated too
    fast_head = head.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([*fast.parameters(), fast_head], lr=cfg.inner_lr)
    fixed = [z.detach() for z in sample_gates(pruner, params, half)]
    for _ in range(cfg.inner_steps):
        with pruner.gates.apply(fixed):
            loss = F.cross_entropy(_cosine_logits(fast.features(qx[:half]), fast_head, cfg.head_scale), qy[:half])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if half < len(qx):
        qx, qy = qx[half:], qy[half:]
    return fast, fast_head, qx, qy


def apply_first_order_grads(pruner: StampPruner, adapted: nn.Module | None) -> None:
    """Add the adapted copy's gradients to the backbone's (first-order MAML); no-op for None."""
    if adapted is None:
        return
    for p, fp in zip(pruner.backbone.parameters(), adapted.parameters()):
        if fp.grad is not None:
            p.grad = fp.grad.clone() if p.grad is None else p.grad + fp.grad


def make_optimizer(pruner: StampPruner, lr: float = 1e-3, backbone_lr: float = 1e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam over encoder + generator (``lr``) and backbone (``backbone_lr``)."""
    return torch.optim.Adam(
        [
            {"params": [*pruner.encoder.parameters(), *pruner.generator.parameters()], "lr": lr},
            {"params": list(pruner.backbone.parameters()), "lr": backbone_lr},
        ],
        weight_decay=weight_decay,
    )


def meta_train_step(
    pruner: StampPruner,
    episodes: Episode | Sequence[Episode],
    optimizer: torch.optim.Optimizer,
    cfg: MetaConfig | None = None,
    grad_hook: Callable[[StampPruner], None] | None = None,
) -> dict[str, float]:
    """Compute the meta-batch loss, back-propagate and update; returns the mean loss parts.

    Args:
        episodes: the meta-batch (one Episode is a batch of one, valid for ``task_norm="running"``).
        grad_hook: called after backward and before the update (e.g. to all-reduce gradients
            across data-parallel workers).
    """
    cfg = cfg or MetaConfig()
    batch = [episodes] if isinstance(episodes, Episode) else list(episodes)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(pruner.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss, parts, adapted = meta_batch_loss(pruner, batch, cfg)
    loss.backward()
    for net in adapted:
        apply_first_order_grads(pruner, net)
    if grad_hook is not None:
        grad_hook(pruner)
    torch.nn.utils.clip_grad_norm_(pruner.parameters(), 5.0)
    optimizer.step()
    return parts
