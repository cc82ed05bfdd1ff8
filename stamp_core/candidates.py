"""A small, named family of masks that the one-pass pruner chooses from, and what one forward pass of a
task's sample tells about the task.

A mask here is a *candidate*: an **allocation** (the fraction of each prunable group to keep) and a
**ranking** (which channels inside a group). Allocations interpolate between L1's own allocation and
uniform width and tilt it with depth; rankings are data-free L1 magnitude or read from the same forward
pass of the task's sample (mean response, class separability). Every candidate is met exactly at the MACs
budget by one global threshold (:func:`spec_for_fractions`), so candidates differ only in *where* the
budget goes, and building any of them costs no pass beyond :func:`probe_task`'s one forward of the sample.

Names (parsed by :meth:`MaskCandidate.parse`, printed by :attr:`MaskCandidate.name`):

* allocation ``l1`` (= ``mix1``), ``uniform`` (= ``mix0``), ``mixW`` (W x L1's fractions + (1 - W) x
  uniform's, 0 <= W <= 1), ``tiltB`` (uniform tilted with depth: fractions x exp(B (depth - 1/2)), depth 0
  for the first group and 1 for the last; ``tilt+1`` keeps deep layers wider), ``mixWtiltB`` (both), each
  optionally followed by ``costC`` (each group's fractions x (its channels' MACs / their geometric mean)^-C:
  ``cost+1`` keeps the groups whose channels cost few MACs wider, e.g. the first conv of a downsampling block
  and deep stages, and narrows the full-resolution ones) and then by ``streamS`` (residual-stream groups,
  those whose channels more than one conv writes, against the convs inside blocks: fractions x exp(+S/2) on
  the stream, x exp(-S/2) inside; ``stream+1`` keeps the stream wider and the blocks' inner convs narrower, the
  way Beta-Bernoulli dropout's trained masks spend a small budget);
  prefixed with ``synflow``, SynFlow's own allocation takes L1's place (``synflow`` = SynFlow's,
  ``synflowmix0.5``, ``synflowtilt+1`` = SynFlow's tilted);
* an optional ranking prefix ``<ranking>_in_``: ``l1`` (default), ``synflow`` (both data-free: weights
  only), ``activation``, ``separability`` (both from the probe's forward pass), ``blend`` (a hedge: the mean
  of a channel's rank inside its group by separability and by L1, so neither a noisy separability estimate
  nor magnitude alone decides).

E.g. ``l1``, ``uniform``, ``mix0.5``, ``tilt+1``, ``mix0.5tilt+1``, ``stream+1``, ``separability_in_mix0.5``,
``synflow_in_synflow`` (the SynFlow baseline's mask), ``separability_in_synflow``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from stamp_core.baselines import score_synflow, score_uniform, select_spec
from stamp_core.channel_generator import channel_response_hook, channel_statistics
from stamp_core.groups import PrunableStructure, score_l1
from stamp_core.spec import PruneSpec

#: rankings inside a group that need nothing beyond the probe's forward pass (l1, synflow: the weights only)
RANKINGS = ("l1", "synflow", "activation", "separability", "blend")
#: data-free scores whose own allocation (each group's share under one global threshold) a candidate can mix in
ALLOCATION_BASES = ("l1", "synflow")
#: the task description :func:`task_features` returns, in this order
FEATURE_NAMES = ("colourfulness", "pixel_spread", "extreme_share", "edge_energy", "head_confidence", "head_entropy",
                 "feature_separability", "log_classes", "log_per_class",
                 *(f"{part}_{stat}" for part in ("early", "mid", "late")
                   for stat in ("separability", "silent_share", "response_spread")))

_ALLOCATION = re.compile(r"^(?:(?P<named>l1|uniform)|(?P<base>synflow)?(?:mix(?P<mix>[0-9]*\.?[0-9]+))?"
                         r"(?:tilt(?P<tilt>[+-][0-9]*\.?[0-9]+))?)(?:cost(?P<cost>[+-][0-9]*\.?[0-9]+))?"
                         r"(?:stream(?P<stream>[+-][0-9]*\.?[0-9]+))?$")


@dataclass(frozen=True)
class MaskCandidate:
    """One mask recipe of the family (see the module docstring).

    Args:
        mix: weight of ``base``'s own allocation against uniform width, in [0, 1] (1 = base's, 0 = uniform).
        tilt: depth tilt B of the fractions (0 = none; + keeps deep groups wider).
        ranking: channel ranking inside a group, one of :data:`RANKINGS`.
        base: whose allocation ``mix`` weighs, one of :data:`ALLOCATION_BASES`.
        stream: tilt S of residual-stream groups against the convs inside blocks (0 = none; + keeps the stream wider).
        cost: exponent C of the per-channel MACs tilt (0 = none; + keeps groups of cheap channels wider).
    """

    mix: float
    tilt: float = 0.0
    ranking: str = "l1"
    base: str = "l1"
    stream: float = 0.0
    cost: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.mix, (int, float)) and 0.0 <= self.mix <= 1.0):
            raise ValueError(f"mix={self.mix!r}: expected a weight in [0, 1] (1 = L1's allocation, 0 = uniform)")
        if not (isinstance(self.tilt, (int, float)) and math.isfinite(self.tilt) and abs(self.tilt) <= 4.0):
            raise ValueError(f"tilt={self.tilt!r}: expected a finite depth tilt in [-4, 4]")
        if not (isinstance(self.stream, (int, float)) and math.isfinite(self.stream) and abs(self.stream) <= 4.0):
            raise ValueError(f"stream={self.stream!r}: expected a finite stream tilt in [-4, 4]")
        if not (isinstance(self.cost, (int, float)) and math.isfinite(self.cost) and abs(self.cost) <= 4.0):
            raise ValueError(f"cost={self.cost!r}: expected a finite MACs tilt exponent in [-4, 4]")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking={self.ranking!r}: expected one of {', '.join(RANKINGS)}")
        if self.base not in ALLOCATION_BASES:
            raise ValueError(f"base={self.base!r}: expected one of {', '.join(ALLOCATION_BASES)}")
        if self.base != "l1" and self.mix == 0.0:
            raise ValueError(f"base={self.base!r} with mix=0 is uniform width: use base='l1' (one name per mask)")

    @property
    def uses_synflow(self) -> bool:
        """Whether building the candidate needs the backbone's SynFlow scores."""
        return "synflow" in (self.base, self.ranking)

    @property
    def allocation(self) -> str:
        tilt = f"tilt{self.tilt:+g}" if self.tilt != 0.0 else ""
        suffix = (f"cost{self.cost:+g}" if self.cost != 0.0 else "") + (
            f"stream{self.stream:+g}" if self.stream != 0.0 else "")
        if self.base != "l1":
            return self.base + (f"mix{self.mix:g}" if self.mix != 1.0 else "") + tilt + suffix
        if not tilt and not suffix and self.mix in (0.0, 1.0):
            return "l1" if self.mix == 1.0 else "uniform"
        mix = "" if self.mix == 0.0 and (tilt or suffix) else f"mix{self.mix:g}"
        return mix + tilt + suffix

    @property
    def name(self) -> str:
        return self.allocation if self.ranking == "l1" else f"{self.ranking}_in_{self.allocation}"

    @classmethod
    def parse(cls, name: str) -> "MaskCandidate":
        """The candidate a name stands for; ValueError naming the grammar on a bad one."""
        ranking, sep, allocation = name.rpartition("_in_")
        found = _ALLOCATION.match(allocation)
        if not found or not allocation or (sep and ranking not in RANKINGS):
            raise ValueError(
                f"unknown mask candidate {name!r}: expected [<ranking>_in_]<allocation> with ranking one of "
                f"{', '.join(RANKINGS)} and allocation l1, uniform, mixW (0<=W<=1), tiltB (e.g. tilt+1) or mixWtiltB, "
                f"optionally prefixed with synflow (SynFlow's allocation in L1's place: synflow, synflowmix0.5) and "
                f"followed by costC and/or streamS (e.g. stream+1, cost+1, mix0.5cost+1stream+1)")
        stream = float(found["stream"]) if found["stream"] is not None else 0.0
        cost = float(found["cost"]) if found["cost"] is not None else 0.0
        if found["named"]:
            if stream != 0.0 or cost != 0.0:  # one name per mask: l1stream+1 is mix1stream+1, uniformcost+1 is cost+1
                same = "mix1" + allocation[2:] if found["named"] == "l1" else allocation[len("uniform"):]
                raise ValueError(f"unknown mask candidate {name!r}: write {same} (one name per mask)")
            mix = 1.0 if found["named"] == "l1" else 0.0
        elif found["base"]:  # SynFlow's allocation itself unless a weight is given
            mix = float(found["mix"]) if found["mix"] is not None else 1.0
        else:
            mix = float(found["mix"]) if found["mix"] is not None else 0.0
        tilt = float(found["tilt"]) if found["tilt"] is not None else 0.0
        return cls(mix=mix, tilt=tilt, ranking=ranking if sep else "l1", base=found["base"] or "l1", stream=stream,
                   cost=cost)


@dataclass
class TaskProbe:
    """What one forward pass of a task's sample through the backbone yields (eval mode, no gates).

    ``features`` is a fixed, named vector describing the task (see :func:`task_features`); the rest is what
    the candidates' rankings read.
    """

    l1: list[torch.Tensor]  #: per group, L1 magnitude of each channel (the weights'; no data)
    activation: list[torch.Tensor]  #: per group, mean post-ReLU response of each channel on the sample
    separability: list[torch.Tensor]  #: per group, share of each channel's response variance explained by the class
    features: dict[str, float]  #: named task description
    synflow: list[torch.Tensor] | None = None  #: per group, SynFlow score of each channel (the weights'; no data)


def probe_task(backbone: nn.Module, structure: PrunableStructure, images: torch.Tensor, labels: torch.Tensor,
               l1: Sequence[torch.Tensor] | None = None, synflow: Sequence[torch.Tensor] | None = None) -> TaskProbe:
    """One forward pass of ``images`` (prepared, a class-balanced sample) through ``backbone``.

    ``l1`` and ``synflow`` may be passed when already computed for these weights (they depend on the weights
    only; SynFlow costs one pass of a single all-ones image).
    """
    responses: list[list[torch.Tensor]] = [[] for _ in structure.groups]
    handles = []
    for gi, group in enumerate(structure.groups):
        for name in group.gate_modules:
            handles.append(backbone.get_submodule(name).register_forward_hook(channel_response_hook(responses[gi])))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone.features(images)
            logits = backbone.classifier(feats)
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    # a group's gated modules (e.g. the convs of a residual stage) share its channels: average them
    per_group = [torch.stack(chunks).mean(0) for chunks in responses]
    stats = channel_statistics(per_group, labels)
    return TaskProbe(
        l1=[s.double() for s in (l1 if l1 is not None else score_l1(backbone, structure))],
        activation=[r.double().mean(0) for r in per_group],
        separability=[st[:, 2].double() for st in stats],
        features=task_features(images, labels, feats, logits, per_group, stats),
        synflow=[s.double() for s in (synflow if synflow is not None else score_synflow(backbone, structure))],
    )


def task_features(images: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor,
                  responses: Sequence[torch.Tensor], stats: Sequence[torch.Tensor],
                  num_classes: int | None = None) -> dict[str, float]:
    """A fixed, named description of a task from its sample and one forward pass (all scale-free).

    Input: colourfulness (spread across RGB, 0 for grayscale), pixel spread, share of near-extreme pixels
    (strokes and scans are mostly background or ink), edge energy. Backbone: how familiar the images are to
    the pretrained head (mean top probability, normalised entropy), class separability of the pooled
    features, and per depth third (early / mid / late groups) the mean class separability of channels, the
    share of near-silent channels and the spread of channel responses. Task shape: log classes, log images
    per class of the sample (``num_classes``: the task's class count, when the sample holds only some classes).
    """
    x = images.double()
    pixels = x * 0.5 + 0.5  # back to [0, 1] (stamp_core.preprocess maps [0, 1] to [-1, 1])
    spread = float(pixels.std())
    lo, hi = pixels.amin(dim=(1, 2, 3), keepdim=True), pixels.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (pixels - lo) / (hi - lo).clamp_min(1e-6)
    edges = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean() + (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean()
    probs = torch.softmax(logits.double(), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])
    out: dict[str, float] = {
        "colourfulness": float(pixels.std(dim=1).mean()) if pixels.shape[1] > 1 else 0.0,
        "pixel_spread": spread,
        "extreme_share": float(((scaled < 0.1) | (scaled > 0.9)).double().mean()),
        "edge_energy": float(edges) / max(spread, 1e-6),
        "head_confidence": float(probs.max(1).values.mean()),
        "head_entropy": float(entropy.mean()),
        "feature_separability": float(channel_statistics([feats], labels)[0][:, 2].double().mean()),
        "log_classes": math.log(num_classes or int(labels.unique().numel())),
        "log_per_class": math.log(len(labels) / int(labels.unique().numel())),
    }
    thirds = _depth_thirds(len(responses))
    for part, groups in zip(("early", "mid", "late"), thirds):
        sep = torch.cat([stats[g][:, 2].double() for g in groups])
        means = torch.cat([responses[g].double().mean(0) for g in groups])
        per_group_max = torch.cat([responses[g].double().mean(0).max().expand(responses[g].shape[1]) for g in groups])
        log_means = torch.log(means + 1e-6)
        out[f"{part}_separability"] = float(sep.mean())
        out[f"{part}_silent_share"] = float((means < 0.01 * per_group_max.clamp_min(1e-12)).double().mean())
        out[f"{part}_response_spread"] = float(log_means.std())
    assert tuple(out) == FEATURE_NAMES
    return out


def _depth_thirds(n: int) -> list[list[int]]:
    cuts = [round(n * k / 3) for k in range(4)]
    thirds = [list(range(cuts[k], cuts[k + 1])) for k in range(3)]
    return [t if t else [min(k, n - 1)] for k, t in enumerate(thirds)]


def spec_for_fractions(fractions: Sequence[float], ranking: Sequence[torch.Tensor], structure: PrunableStructure,
                       backbone_config: dict[str, Any], macs_ratio: float, round_to: int = 1,
                       metadata: dict[str, Any] | None = None, num_classes: int | None = None) -> PruneSpec:
    """Keep about ``fractions[g]`` of group ``g``, its best channels by ``ranking``, exactly at the budget (met with
    a ``num_classes``-way head when given, :func:`~stamp_core.baselines.select_spec`).

    One global threshold on ``fractions[g] - (rank inside the group + 0.5) / size``: the fractions set the
    allocation, the ranking the order inside a group, and the threshold meets the budget exactly.
    """
    scores = []
    for f, s in zip(fractions, ranking):
        n = s.numel()
        rank = torch.empty(n, dtype=torch.float64)
        rank[s.double().argsort(descending=True, stable=True)] = torch.arange(n, dtype=torch.float64)
        scores.append(float(f) - (rank + 0.5) / n)
    return select_spec(scores, structure, backbone_config, macs_ratio, round_to=round_to, metadata=metadata,
                       num_classes=num_classes)


def kept_fractions(spec: PruneSpec, structure: PrunableStructure) -> list[float]:
    """Fraction of each group ``spec`` keeps."""
    return [len(spec.kept[g.name]) / g.size for g in structure.groups]


def candidate_fractions(candidate: MaskCandidate, base: Sequence[torch.Tensor], structure: PrunableStructure,
                        backbone_config: dict[str, Any], macs_ratio: float, num_classes: int | None = None) -> list[float]:
    """Per-group keep fractions of ``candidate``'s allocation at budget ``macs_ratio`` (before the threshold);
    ``base``: the channel scores of ``candidate.base`` (L1 or SynFlow), whose own allocation ``mix`` weighs;
    ``num_classes``: the deployed head the budget is met with."""
    uniform = kept_fractions(select_spec(score_uniform(structure), structure, backbone_config, macs_ratio,
                                         num_classes=num_classes), structure)
    fractions = uniform
    if candidate.mix > 0.0:
        own = kept_fractions(select_spec(base, structure, backbone_config, macs_ratio, normalize=True,
                                         num_classes=num_classes), structure)
        fractions = [candidate.mix * a + (1.0 - candidate.mix) * b for a, b in zip(own, uniform)]
    if candidate.tilt != 0.0:
        last = max(len(fractions) - 1, 1)
        fractions = [min(1.0, f * math.exp(candidate.tilt * (g / last - 0.5))) for g, f in enumerate(fractions)]
    if candidate.cost != 0.0:
        costs = structure.channel_macs()
        log_mean = sum(math.log(c) for c in costs) / len(costs)
        fractions = [min(1.0, f * math.exp(-candidate.cost * (math.log(c) - log_mean)))
                     for f, c in zip(fractions, costs)]
    if candidate.stream != 0.0:
        stream = stream_groups(structure)
        if not any(stream) or all(stream):
            raise ValueError(f"candidate {candidate.name!r} tilts residual-stream groups against the convs inside "
                             f"blocks: this structure has {'no' if not any(stream) else 'only'} stream groups "
                             f"(a plain CNN?), so the tilt would change nothing")
        fractions = [min(1.0, f * math.exp(candidate.stream * (0.5 if s else -0.5))) for f, s in zip(fractions, stream)]
    return fractions


def stream_groups(structure: PrunableStructure) -> list[bool]:
    """Per group, whether it is a residual stream: its channels are written by more than one conv (a stem or
    shortcut and the blocks' last convs, summed), so pruning one of them narrows every block of a stage."""
    writers = [0] * structure.num_groups
    for layer in structure.layers:
        if layer.out_group >= 0:
            writers[layer.out_group] += 1
    return [w > 1 for w in writers]


def blend_ranking(*rankings: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per group, the mean of each channel's rank percentile (0 = lowest score, 1 = highest) under every
    ranking: rank-based, so scores of different scales weigh equally and only the order inside a group counts."""
    if not rankings or len({len(r) for r in rankings}) != 1:
        raise ValueError(f"blend_ranking: expected one or more rankings with the same number of groups, "
                         f"got {[len(r) for r in rankings]}")
    blended = []
    for per_group in zip(*rankings):
        n = per_group[0].numel()
        if any(s.numel() != n for s in per_group):
            raise ValueError(f"blend_ranking: a group's rankings differ in size: {[s.numel() for s in per_group]}")
        total = torch.zeros(n, dtype=torch.float64)
        for s in per_group:
            pct = torch.empty(n, dtype=torch.float64)
            pct[s.double().argsort(stable=True)] = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
            total += pct
        blended.append(total / len(per_group))
    return blended


def build_candidate(candidate: MaskCandidate | str, probe: TaskProbe, structure: PrunableStructure,
                    backbone_config: dict[str, Any], macs_ratio: float, round_to: int = 1,
                    num_classes: int | None = None) -> PruneSpec:
    """The PruneSpec of ``candidate`` for the probed task at budget ``macs_ratio`` (``round_to``: keep a
    multiple of this many channels per group; ``num_classes``: the deployed head the budget is met with, None:
    the backbone's)."""
    if isinstance(candidate, str):
        candidate = MaskCandidate.parse(candidate)
    if candidate.uses_synflow and probe.synflow is None:
        raise ValueError(f"candidate {candidate.name!r} reads SynFlow scores: the probe has none (pass synflow=)")
    scores = {"l1": probe.l1, "synflow": probe.synflow, "activation": probe.activation,
              "separability": probe.separability}
    if candidate.ranking == "blend":
        scores["blend"] = blend_ranking(probe.separability, probe.l1)
    fractions = candidate_fractions(candidate, scores[candidate.base], structure, backbone_config, macs_ratio,
                                    num_classes)
    ranking = scores[candidate.ranking]
    return spec_for_fractions(fractions, ranking, structure, backbone_config, macs_ratio, round_to,
                              metadata={"method": "candidate", "candidate": candidate.name}, num_classes=num_classes)
