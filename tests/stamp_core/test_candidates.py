"""stamp_core.candidates: the named mask family (allocation x ranking) and the one-pass task probe."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stamp_core import analyze_structure, build_backbone
from stamp_core.baselines import score_uniform, select_spec
from stamp_core.candidates import (
    FEATURE_NAMES,
    MaskCandidate,
    blend_ranking,
    build_candidate,
    candidate_fractions,
    kept_fractions,
    probe_task,
    stream_groups,
)
from stamp_core.groups import score_l1
from tests.stamp_core._tasks import make_images

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    net = build_backbone("resnet20", 10).eval()
    return net, analyze_structure(net, SHAPE)


def _task(family: str, classes: int = 4, per_class: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    return make_images(family, y, gen), y  # already prepared: [-1, 1], (N, 3, 32, 32)


@pytest.mark.parametrize("name, mix, tilt, ranking, base", [
    ("l1", 1.0, 0.0, "l1", "l1"), ("uniform", 0.0, 0.0, "l1", "l1"), ("mix0.5", 0.5, 0.0, "l1", "l1"),
    ("tilt+1", 0.0, 1.0, "l1", "l1"), ("tilt-0.5", 0.0, -0.5, "l1", "l1"), ("mix0.5tilt+1", 0.5, 1.0, "l1", "l1"),
    ("mix1tilt+1", 1.0, 1.0, "l1", "l1"), ("separability_in_l1", 1.0, 0.0, "separability", "l1"),
    ("activation_in_mix0.25tilt-1", 0.25, -1.0, "activation", "l1"),
    ("synflow", 1.0, 0.0, "l1", "synflow"), ("synflow_in_synflow", 1.0, 0.0, "synflow", "synflow"),
    ("separability_in_synflowmix0.5tilt+1", 0.5, 1.0, "separability", "synflow"),
    ("synflow_in_uniform", 0.0, 0.0, "synflow", "l1"), ("synflowtilt+1", 1.0, 1.0, "l1", "synflow"),
    ("blend_in_tilt+1", 0.0, 1.0, "blend", "l1"),
])
def test_names_parse_and_print_back(name: str, mix: float, tilt: float, ranking: str, base: str) -> None:
    candidate = MaskCandidate.parse(name)
    assert (candidate.mix, candidate.tilt, candidate.ranking, candidate.base) == (mix, tilt, ranking, base)
    assert candidate.name == name
    assert MaskCandidate.parse(candidate.name) == candidate


@pytest.mark.parametrize("name, mix, tilt, stream, ranking", [
    ("stream+1", 0.0, 0.0, 1.0, "l1"), ("mix0.5stream+0.5", 0.5, 0.0, 0.5, "l1"), ("mix1stream-1", 1.0, 0.0, -1.0, "l1"),
    ("tilt+1stream+1", 0.0, 1.0, 1.0, "l1"), ("blend_in_mix0.5tilt+1stream+2", 0.5, 1.0, 2.0, "blend"),
])
def test_stream_names_parse_and_print_back(name: str, mix: float, tilt: float, stream: float, ranking: str) -> None:
    candidate = MaskCandidate.parse(name)
    assert (candidate.mix, candidate.tilt, candidate.stream, candidate.ranking) == (mix, tilt, stream, ranking)
    assert candidate.name == name and MaskCandidate.parse(name) == candidate


def test_a_stream_tilt_has_one_name_per_mask() -> None:
    with pytest.raises(ValueError, match=r"'l1stream\+1': write mix1stream\+1 \(one name per mask\)"):
        MaskCandidate.parse("l1stream+1")
    with pytest.raises(ValueError, match=r"'uniformstream\+1': write stream\+1 \(one name per mask\)"):
        MaskCandidate.parse("uniformstream+1")
    with pytest.raises(ValueError, match=r"stream=nan: expected a finite stream tilt"):
        MaskCandidate(mix=1.0, stream=math.nan)


@pytest.mark.parametrize("name, mix, tilt, cost, stream, ranking", [
    ("cost+1", 0.0, 0.0, 1.0, 0.0, "l1"), ("mix0.5cost+0.5", 0.5, 0.0, 0.5, 0.0, "l1"),
    ("tilt+1cost-1stream+1", 0.0, 1.0, -1.0, 1.0, "l1"), ("blend_in_cost+1stream+1", 0.0, 0.0, 1.0, 1.0, "blend"),
])
def test_cost_names_parse_and_print_back(name: str, mix: float, tilt: float, cost: float, stream: float,
                                         ranking: str) -> None:
    candidate = MaskCandidate.parse(name)
    assert (candidate.mix, candidate.tilt, candidate.cost, candidate.stream, candidate.ranking) == (
        mix, tilt, cost, stream, ranking)
    assert candidate.name == name and MaskCandidate.parse(name) == candidate
    with pytest.raises(ValueError, match=r"'l1cost\+1': write mix1cost\+1 \(one name per mask\)"):
        MaskCandidate.parse("l1cost+1")
    with pytest.raises(ValueError, match=r"cost=inf: expected a finite MACs tilt exponent"):
        MaskCandidate(mix=1.0, cost=math.inf)


@pytest.mark.parametrize("name", ["", "l2", "mix1.5", "snip_in_l1", "separability_in_", "tilt1", "mix0.5tilt", "L1",
                                  "synflowl1", "l1synflow", "synflow_in_snip", "stream1", "streamx", "stream+1tilt+1",
                                  "cost1", "stream+1cost+1", "cost+1tilt+1"])
def test_a_bad_name_is_refused_with_the_grammar(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown mask candidate .*expected \[<ranking>_in_\]<allocation>|mix=.*expected a weight"):
        MaskCandidate.parse(name)


def test_bad_fields_are_refused() -> None:
    with pytest.raises(ValueError, match=r"ranking='snip': expected one of l1, synflow, activation, separability"):
        MaskCandidate(mix=1.0, ranking="snip")
    with pytest.raises(ValueError, match=r"base='synflow' with mix=0 is uniform width"):
        MaskCandidate.parse("synflowmix0")
    with pytest.raises(ValueError, match=r"base='snip': expected one of l1, synflow"):
        MaskCandidate(mix=1.0, base="snip")
    with pytest.raises(ValueError, match=r"tilt=inf: expected a finite depth tilt"):
        MaskCandidate(mix=1.0, tilt=math.inf)


def test_synflow_in_synflow_is_the_synflow_baselines_mask(resnet: tuple) -> None:
    from stamp_core.baselines import score_synflow

    net, structure = resnet
    x, y = _task("color")
    probe = probe_task(net, structure, x, y)
    synflow = score_synflow(net, structure)
    assert all(torch.equal(a, b.double()) for a, b in zip(probe.synflow, synflow))
    for r in (0.5, 0.3, 0.1):
        baseline = select_spec(synflow, structure, net.config, r, normalize=True)
        candidate = build_candidate("synflow_in_synflow", probe, structure, net.config, r)
        # the same channels, up to the calibration's use of the budget's slack (one channel at r=0.1 here)
        differ = sum(len(set(candidate.kept[g]) ^ set(baseline.kept[g])) for g in baseline.kept)
        assert differ <= 2, (r, differ)
        # SynFlow's allocation with L1's ranking keeps about as many channels per group, many of them others
        l1_ranked = build_candidate("synflow", probe, structure, net.config, r)
        assert sum(abs(len(l1_ranked.kept[g]) - len(baseline.kept[g])) for g in baseline.kept) <= 2
        assert sum(len(set(l1_ranked.kept[g]) ^ set(baseline.kept[g])) for g in baseline.kept) > 20
    no_synflow = dataclasses.replace(probe, synflow=None)
    with pytest.raises(ValueError, match="'separability_in_synflow' reads SynFlow scores: the probe has none"):
        build_candidate("separability_in_synflow", no_synflow, structure, net.config, 0.3)
    assert build_candidate("separability_in_l1", no_synflow, structure, net.config, 0.3).kept  # needs none


def test_every_candidate_meets_the_budget_and_the_family_spans_allocations(resnet: tuple) -> None:
    net, structure = resnet
    x, y = _task("color")
    probe = probe_task(net, structure, x, y)
    fractions = {}
    for name in ("l1", "uniform", "mix0.5", "tilt+1", "tilt-1", "separability_in_l1"):
        for r in (0.1, 0.3, 0.7):
            spec = build_candidate(name, probe, structure, net.config, r)
            assert spec.macs_pruned <= r * spec.macs_full and spec.macs_ratio > r - 0.01, (name, r, spec.macs_ratio)
            assert spec.metadata == {"method": "candidate", "candidate": name}
        fractions[name] = kept_fractions(build_candidate(name, probe, structure, net.config, 0.3), structure)
    # L1's own allocation: the candidate keeps what torch-pruning's global L1 mask keeps in every group.
    direct = select_spec(score_l1(net, structure), structure, net.config, 0.3, normalize=True)
    assert fractions["l1"] == pytest.approx(kept_fractions(direct, structure), abs=0.07)
    uniform = kept_fractions(select_spec(score_uniform(structure), structure, net.config, 0.3), structure)
    assert fractions["uniform"] == pytest.approx(uniform, abs=0.07)
    # Tilts move the budget with depth: +1 keeps the last group wider and the first narrower than uniform.
    assert fractions["tilt+1"][-1] > fractions["uniform"][-1] > fractions["tilt-1"][-1]
    assert fractions["tilt+1"][0] < fractions["uniform"][0] < fractions["tilt-1"][0]
    # A ranking keeps the allocation and changes which channels.
    same_l1 = build_candidate("l1", probe, structure, net.config, 0.3)
    separable = build_candidate("separability_in_l1", probe, structure, net.config, 0.3)
    assert separable.kept_counts() == same_l1.kept_counts()
    assert separable.kept != same_l1.kept


def test_blend_ranking_averages_rank_percentiles_inside_each_group() -> None:
    by_a = [torch.tensor([30.0, 20.0, 10.0, 0.0]), torch.tensor([1.0, 2.0])]
    by_b = [torch.tensor([0.0, 0.9, 0.5, 0.2]), torch.tensor([5.0, 4.0])]  # another scale: only the order counts
    blended = blend_ranking(by_a, by_b)
    assert torch.allclose(blended[0], torch.tensor([0.5, 5 / 6, 0.5, 1 / 6], dtype=torch.float64))
    assert torch.allclose(blended[1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(blend_ranking(by_b, by_b)[0].argsort(), by_b[0].argsort())  # blending one ranking keeps it
    with pytest.raises(ValueError, match=r"same number of groups, got \[2, 1\]"):
        blend_ranking(by_a, by_b[:1])
    with pytest.raises(ValueError, match=r"a group's rankings differ in size: \[4, 3\]"):
        blend_ranking(by_a[:1], [by_b[0][:3]])


def test_the_blend_candidate_keeps_the_allocation_and_hedges_between_its_two_rankings(resnet: tuple) -> None:
    net, structure = resnet
    probe = probe_task(net, structure, *_task("color"))
    masks = {name: build_candidate(f"{name}_in_uniform", probe, structure, net.config, 0.3)
             for name in ("l1", "separability", "blend")}
    assert masks["blend"].kept_counts() == masks["l1"].kept_counts() == masks["separability"].kept_counts()
    blended = blend_ranking(probe.separability, probe.l1)
    for group, scores in zip(structure.groups, blended):  # each group keeps its best channels by the blend
        kept = masks["blend"].kept[group.name]
        dropped = sorted(set(range(group.size)) - set(kept))
        if dropped:
            assert scores[list(kept)].min() >= scores[dropped].max()
    assert masks["blend"].kept != masks["l1"].kept and masks["blend"].kept != masks["separability"].kept


def test_a_stream_tilt_moves_the_budget_from_the_blocks_inner_convs_to_the_residual_stream(resnet: tuple) -> None:
    net, structure = resnet
    # resnet20: the stem's group (stage 1's stream) and stages 2-3's shortcut groups are each written by four convs
    assert [g.name for g, s in zip(structure.groups, stream_groups(structure)) if s] == [
        "conv1", "layers.1.0.shortcut.0", "layers.2.0.shortcut.0"]
    probe = probe_task(net, structure, *_task("color"))
    for r in (0.5, 0.3, 0.1):
        uniform = kept_fractions(build_candidate("uniform", probe, structure, net.config, r), structure)
        spec = build_candidate("stream+1", probe, structure, net.config, r)
        assert spec.macs_pruned <= r * spec.macs_full and spec.macs_ratio > r - 0.01, (r, spec.macs_ratio)
        wide = kept_fractions(spec, structure)
        for f, u, s in zip(wide, uniform, stream_groups(structure)):
            assert (f > u) if s else (f < u), (r, f, u, s)
        # the same allocation with another ranking: the same counts, other channels
        blend = build_candidate("blend_in_stream+1", probe, structure, net.config, r)
        assert blend.kept_counts() == spec.kept_counts() and blend.kept != spec.kept
    # without a residual stream the tilt would change nothing, so the candidate is refused
    vgg = build_backbone("vgg11", 10).eval()
    vgg_structure = analyze_structure(vgg, SHAPE)
    assert not any(stream_groups(vgg_structure))
    with pytest.raises(ValueError, match=r"'stream\+1' tilts residual-stream groups .* has no stream groups"):
        candidate_fractions(MaskCandidate.parse("stream+1"), score_l1(vgg, vgg_structure), vgg_structure, vgg.config, 0.3)


def test_a_cost_tilt_keeps_groups_of_cheap_channels_wider(resnet: tuple) -> None:
    net, structure = resnet
    macs = dict(zip([g.name for g in structure.groups], structure.channel_macs()))
    # counted by hand at 32 px: the stem's group is written by the stem (3 in, 9 x 1024 positions) and stage 1's
    # three conv2s, and read by stage 1's three conv1s, the stride-2 conv1 (9 x 256) and the 1x1 shortcut (256)
    assert macs["conv1"] == 9 * 1024 * 3 + 6 * 9 * 1024 * 16 + 9 * 256 * 32 + 256 * 32
    # a downsampling block's first conv writes at the stage's lower resolution from the narrower stream
    assert macs["layers.1.0.conv1"] == 9 * 256 * 16 + 9 * 256 * 32 < macs["layers.1.1.conv1"] == 2 * 9 * 256 * 32
    # the pruner generates under inference mode: the count needs no gradients
    with torch.inference_mode():
        assert structure.channel_macs() == list(macs.values())
    probe = probe_task(net, structure, *_task("color"))
    cheap_first = sorted(macs, key=macs.get)
    for r in (0.5, 0.3, 0.1):
        uniform_spec = build_candidate("uniform", probe, structure, net.config, r)
        uniform = dict(zip(macs, kept_fractions(uniform_spec, structure)))
        spec = build_candidate("cost+1", probe, structure, net.config, r)
        assert spec.macs_pruned <= r * spec.macs_full and spec.macs_ratio > r - 0.01, (r, spec.macs_ratio)
        tilted = dict(zip(macs, kept_fractions(spec, structure)))
        assert tilted[cheap_first[0]] > uniform[cheap_first[0]] and tilted[cheap_first[-1]] < uniform[cheap_first[-1]]
        # (at r=0.5 both of stage 2's are kept whole: fractions are capped at 1)
        assert tilted["layers.1.0.conv1"] >= tilted["layers.1.1.conv1"] and tilted["layers.2.0.conv1"] >= tilted[
            "layers.2.1.conv1"], (r, tilted)
        assert r == 0.5 or tilted["layers.1.0.conv1"] > tilted["layers.1.1.conv1"], (r, tilted)
        # the opposite sign spends the budget the other way
        against = dict(zip(macs, kept_fractions(build_candidate("cost-1", probe, structure, net.config, r), structure)))
        assert against["conv1"] > uniform["conv1"] > tilted["conv1"], (r, against["conv1"], uniform["conv1"])


def test_mix_interpolates_between_l1_and_uniform(resnet: tuple) -> None:
    net, structure = resnet
    l1 = score_l1(net, structure)
    f = {w: candidate_fractions(MaskCandidate(mix=w), l1, structure, net.config, 0.3) for w in (0.0, 0.5, 1.0)}
    assert f[0.5] == pytest.approx([(a + b) / 2 for a, b in zip(f[0.0], f[1.0])])


def test_probe_features_are_named_finite_and_tell_grayscale_from_colour(resnet: tuple) -> None:
    net, structure = resnet
    colour = probe_task(net, structure, *_task("color"))
    x, y = _task("orientation", classes=6)
    gray = probe_task(net, structure, x.mean(1, keepdim=True).expand_as(x), y)
    assert tuple(colour.features) == tuple(gray.features) == FEATURE_NAMES
    assert all(math.isfinite(v) for v in [*colour.features.values(), *gray.features.values()])
    assert gray.features["colourfulness"] == pytest.approx(0.0, abs=1e-6)
    assert colour.features["colourfulness"] > 0.01
    assert gray.features["log_classes"] == pytest.approx(math.log(6))
    assert colour.features["log_per_class"] == pytest.approx(math.log(10))
    assert 0 < colour.features["head_confidence"] <= 1 and 0 <= colour.features["head_entropy"] <= 1
    assert [len(a) for a in colour.activation] == [g.size for g in structure.groups]
    # The sample decides the data-aware rankings; the weights alone decide L1's.
    assert any(not torch.equal(a, b) for a, b in zip(colour.separability, gray.separability))
    assert all(torch.equal(a, b) for a, b in zip(colour.l1, gray.l1))
