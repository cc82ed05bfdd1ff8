"""Pruning baselines: per-group channel scores, the shared MACs calibration, Beta-Bernoulli dropout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from stamp_core import StampPruner, analyze_structure, build_backbone, init_classifier_from_prototypes
from stamp_core.baselines import (
    BBDConfig,
    per_channel_sum,
    score_grasp,
    score_l1,
    score_random,
    score_snip,
    score_synflow,
    score_uniform,
    select_spec,
    train_beta_bernoulli_dropout,
)

SHAPE = (3, 32, 32)


def _net(name: str = "small_cnn", classes: int = 4, seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    kwargs = {"width": 8} if name == "small_cnn" else {}
    model = build_backbone(name, classes, **kwargs).eval()
    # Non-trivial BatchNorm statistics, so eval-mode code paths see something other than identity.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model, analyze_structure(model, SHAPE)


def _batch(n: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    # Class-dependent mean brightness per colour channel: a learnable signal, so gradients are informative.
    x = torch.rand(n, *SHAPE, generator=gen) * 0.5 + 0.5 * torch.nn.functional.one_hot(y % 3, 3).float().view(n, 3, 1, 1)
    return x, y


def _all_scores(model: nn.Module, structure, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    return {
        "uniform": score_uniform(structure), "random": score_random(structure, 0), "l1": score_l1(model, structure),
        "snip": score_snip(model, structure, x, y), "grasp": score_grasp(model, structure, x, y),
        "synflow": score_synflow(model, structure),
    }


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet20"])
def test_every_scorer_gives_one_finite_score_per_channel_and_leaves_the_model_alone(backbone: str) -> None:
    model, structure = _net(backbone)
    before = copy.deepcopy(model.state_dict())
    x, y = _batch(n=8)
    for method, scores in _all_scores(model, structure, x, y).items():
        assert [len(s) for s in scores] == [g.size for g in structure.groups], method
        assert all(torch.isfinite(s).all() for s in scores), method
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a scorer modified the model it scored"


def test_scorers_are_deterministic_and_random_depends_on_its_seed() -> None:
    model, structure = _net()
    x, y = _batch()
    first, second = _all_scores(model, structure, x, y), _all_scores(model, structure, x, y)
    for method in first:
        assert all(torch.equal(a, b) for a, b in zip(first[method], second[method])), method
    other = score_random(structure, 1)
    assert not all(torch.equal(a, b) for a, b in zip(first["random"], other))


def test_l1_is_torch_prunings_group_magnitude_and_equals_the_exact_per_channel_sum() -> None:
    model, structure = _net("resnet20")
    l1 = score_l1(model, structure)
    exact = per_channel_sum(model, structure, {n: p.detach().abs() for n, p in model.named_parameters()})
    for a, b in zip(l1, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _kill_channel(model: nn.Module, conv: str, bn: str, channel: int) -> None:
    with torch.no_grad():
        model.get_submodule(conv).weight[channel].zero_()
        model.get_submodule(bn).weight[channel] = 0.0
        model.get_submodule(bn).bias[channel] = 0.0


def _first_conv_bn(model: nn.Module, structure) -> tuple[int, str, str]:
    group = structure.groups[0]
    return 0, group.name, group.gate_modules[0]


def test_l1_ranks_a_zeroed_filter_last_in_its_group() -> None:
    model, structure = _net()
    gi, conv, bn = _first_conv_bn(model, structure)
    _kill_channel(model, conv, bn, 3)
    scores = score_l1(model, structure)[gi]
    assert int(scores.argmin()) == 3
    # What remains of channel 3 is exactly the consumers' input weights that read it.
    consumers = [layer.name for layer in structure.layers if layer.in_group == gi]
    expected = sum(float(model.get_submodule(c).weight.detach()[:, 3].abs().sum()) for c in consumers)
    assert scores[3].item() == pytest.approx(expected, rel=1e-5)


def test_snip_scores_a_dead_channel_exactly_zero() -> None:
    model, structure = _net()
    gi, conv, bn = _first_conv_bn(model, structure)
    _kill_channel(model, conv, bn, 2)
    x, y = _batch()
    scores = score_snip(model, structure, x, y)[gi]
    assert scores[2].item() == 0.0
    assert (scores[torch.arange(len(scores)) != 2] > 0).all()


def test_synflow_is_data_free_positive_and_ignores_weight_signs_and_bn_statistics() -> None:
    model, structure = _net()
    base = score_synflow(model, structure)
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for p in flipped.parameters():
            p.neg_()
        for m in flipped.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(3.0, 4.0)
    for a, b in zip(base, score_synflow(flipped, structure)):
        torch.testing.assert_close(a, b)
    assert all((s > 0).all() for s in base)


def test_grasp_keep_scores_are_the_negated_saliency_per_channel() -> None:
    model, structure = _net()
    x, y = _batch()
    scores = score_grasp(model, structure, x, y)
    # Recompute -(-w * Hg) = w * Hg for one parameter directly: the classifier-adjacent group's BN weight.
    net = copy.deepcopy(model).train()
    params = [p for p in net.parameters()]
    loss = nn.functional.cross_entropy(net(x), y)
    g = [gi.detach() for gi in torch.autograd.grad(loss, params)]
    grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params, create_graph=True)
    hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, g)), params)
    sal = {n: (p * h).detach() for (n, p), h in zip(net.named_parameters(), hg)}
    torch.testing.assert_close(scores[0], per_channel_sum(net, structure, sal)[0])
    assert any((s < 0).any() for s in scores) or any((s > 0).any() for s in scores)


def test_gradient_scorers_name_a_head_that_is_too_small() -> None:
    model, structure = _net(classes=2)
    x, y = _batch(classes=4)
    with pytest.raises(ValueError, match="labels go up to 3 but the classifier has 2 outputs"):
        score_snip(model, structure, x, y)


@pytest.fixture(scope="module")
def resnet_scores() -> tuple[nn.Module, object, dict[str, list[torch.Tensor]]]:
    model, structure = _net("resnet20")
    x, y = _batch(n=8)
    return model, structure, _all_scores(model, structure, x, y)


@pytest.mark.parametrize("method", ["uniform", "random", "l1", "snip", "synflow", "grasp"])
def test_selection_meets_the_budget_within_three_points(method: str, resnet_scores) -> None:
    from stamp_core import count_macs_params

    model, structure, scores = resnet_scores
    for r in (0.5, 0.3, 0.1):
        spec = select_spec(scores[method], structure, model.config, r, normalize=method in ("l1", "snip", "synflow", "grasp"))
        assert r - 0.03 <= spec.macs_ratio <= r, (method, r, spec.macs_ratio)
        assert spec.metadata == {} and spec.macs_ratio_target == r
    # The spec's MACs are the real MACs of the physically pruned network.
    pruned = spec.apply(build_backbone("resnet20", 4))
    assert count_macs_params(pruned, SHAPE)[0] == spec.macs_pruned


def test_uniform_keeps_the_same_fraction_of_every_group() -> None:
    model, structure = _net("resnet20")
    spec = select_spec(score_uniform(structure), structure, model.config, 0.3)
    fractions = [len(spec.kept[g.name]) / g.size for g in structure.groups]
    assert max(fractions) - min(fractions) <= max(1 / g.size for g in structure.groups) + 1e-9
    assert 0.27 <= spec.macs_ratio <= 0.3


def test_selection_keeps_the_top_scored_channels() -> None:
    model, structure = _net()
    scores = [torch.arange(g.size, dtype=torch.float64) for g in structure.groups]  # higher index = keep
    spec = select_spec(scores, structure, model.config, 0.5)
    for g in structure.groups:
        kept = spec.kept[g.name]
        assert kept == list(range(g.size - len(kept), g.size))


def test_selection_rejects_malformed_scores_by_name() -> None:
    model, structure = _net()
    good = score_uniform(structure)
    with pytest.raises(ValueError, match=rf"got scores for 1 groups: expected {structure.num_groups}"):
        select_spec(good[:1], structure, model.config, 0.5)
    bad = [s.clone() for s in good]
    bad[1][0] = float("nan")
    with pytest.raises(ValueError, match=rf"group '{structure.groups[1].name}': scores contain NaN"):
        select_spec(bad, structure, model.config, 0.5)
    short = [s.clone() for s in good]
    short[0] = short[0][:-1]
    with pytest.raises(ValueError, match=rf"got {structure.groups[0].size - 1} scores, expected {structure.groups[0].size}"):
        select_spec(short, structure, model.config, 0.5)
    with pytest.raises(ValueError, match=r"macs_ratio=1.5: expected a number in \(0, 1\]"):
        select_spec(good, structure, model.config, 1.5)


def test_beta_bernoulli_dropout_trains_gates_towards_the_budget() -> None:
    model, structure = _net(classes=4)
    x, y = _batch(n=64)
    init_classifier_from_prototypes(model, x, y)
    before = copy.deepcopy(model.state_dict())
    result = train_beta_bernoulli_dropout(model, structure, x, y, 0.2,
                                          BBDConfig(epochs=4, batch_size=32, macs_weight=50.0, seed=0))
    assert [len(s) for s in result.scores] == [g.size for g in structure.groups]
    assert all(((s > 0) & (s < 1)).all() for s in result.scores)
    assert result.seconds > 0 and len(result.history) == 4
    # The MACs penalty pulls the expected MACs down from the base posterior's (~0.6 of full).
    assert result.history[-1]["expected_macs_ratio"] < result.history[0]["expected_macs_ratio"] - 0.02
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "BBD must train the weights"
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules()), "gate hooks left behind"
    spec = select_spec(result.scores, structure, model.config, 0.2)
    assert 0.17 <= spec.macs_ratio <= 0.2


def test_mean_embedding_is_the_average_of_task_embeddings_and_drives_generate() -> None:
    pruner = StampPruner.create("small_cnn", num_classes=4, backbone_kwargs={"width": 8}, embed_dim=16,
                                hidden_dim=32, num_heads=2, num_inducing=4)
    tasks = [_batch(n=12, classes=3, seed=s) for s in (1, 2)]
    mean = pruner.mean_embedding(tasks)
    singles = torch.stack([pruner.mean_embedding([t]).embedding for t in tasks])
    torch.testing.assert_close(mean.embedding, singles.mean(0))
    assert mean.channel_stats is None, "the faithful generator reads no channel statistics"
    x, y = _batch(n=12, classes=3, seed=9)
    a = pruner.generate(x, y, macs_ratio=0.4, embedding=mean)
    b = pruner.generate(x + 0.3, y, macs_ratio=0.4, embedding=mean)
    assert a.kept == b.kept, "with a given embedding the mask must not depend on the images"
    with pytest.raises(ValueError, match="mean_embedding needs at least one"):
        pruner.mean_embedding([])




def test_criteria_registry_scores_through_one_funnel_and_names_what_exists() -> None:
    from stamp_core.baselines import ScoringInput, get_criterion, list_criteria, register_criterion, spec_by_criterion, unregister_criterion

    assert list_criteria()[:7] == ["uniform", "random", "l1", "snip", "grasp", "synflow", "bbd"]
    with pytest.raises(ValueError, match="unknown pruning criterion 'l2'.*uniform, random, l1"):
        get_criterion("l2")
    model, structure = _net()
    inp = ScoringInput(model, structure, torch.randn(8, *SHAPE), torch.arange(8) % 4, macs_ratio=0.4)
    via_registry = spec_by_criterion("l1", inp, model.config)
    direct = select_spec(score_l1(model, structure), structure, model.config, 0.4, normalize=True, metadata={"method": "l1"})
    assert via_registry.kept == direct.kept

    @register_criterion("l1_least", "least L1 (planted)", normalize=True)
    def _least(i: ScoringInput) -> list[torch.Tensor]:
        return [-s for s in score_l1(i.model, i.structure)]

    try:
        least = spec_by_criterion("l1_least", inp, model.config)
        # The opposite ranking keeps (almost) disjoint channels in every group that is pruned at all.
        shared = sum(len(set(least.kept[g]) & set(direct.kept[g])) for g in direct.kept)
        assert shared < 0.5 * sum(len(k) for k in direct.kept.values())
    finally:
        unregister_criterion("l1_least")
    assert "l1_least" not in list_criteria()
    with pytest.raises(ValueError, match="criterion name"):
        register_criterion("bad name!", "x")
