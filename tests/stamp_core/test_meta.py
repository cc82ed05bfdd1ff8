"""Meta-training: the step updates what it should, budgets are learned, masks adapt to the task."""

import copy

import pytest
import torch

from _tasks import FAMILIES, cross_evaluate, held_out_task, make_episode, two_family_backbone
from stamp_core import MetaConfig, StampPruner, layer_es_surrogate, make_optimizer, meta_batch_loss, meta_train_step


def _episode(seed: int = 0, ratio: float = 0.3):
    return make_episode("color", torch.Generator().manual_seed(seed), ways=4, shots=5, query=16, macs_ratio=ratio)


def _batch(seed: int = 0, ratio: float = 0.3):
    """A meta-batch of two tasks (task_norm="batch" standardises embeddings across it)."""
    gen = torch.Generator().manual_seed(seed)
    return [make_episode(family, gen, ways=4, shots=5, query=16, macs_ratio=ratio) for family in ("color", "orientation")]


@pytest.mark.parametrize("inner_steps", [0, 2])
def test_step_updates_encoder_generator_and_backbone(inner_steps: int) -> None:
    torch.manual_seed(0)
    pruner = StampPruner.create("small_cnn", 4, backbone_kwargs={"width": 8})
    before = copy.deepcopy(pruner.state_dict())
    opt = make_optimizer(pruner)
    # The generator's heads start at zero (the first mask is L1's), so the first step moves only
    # them and the base scores; from the second on the task path reaches the encoder.
    first = meta_train_step(pruner, _batch(), opt, MetaConfig(inner_steps=inner_steps))
    assert all(torch.equal(before[k], v) for k, v in pruner.state_dict().items() if k.startswith("encoder."))
    assert first["loss"] > 0
    parts = meta_train_step(pruner, _batch(1), opt, MetaConfig(inner_steps=inner_steps))
    assert set(parts) >= {"loss", "ce", "kl", "macs_penalty", "expected_macs_ratio", "accuracy"}
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    assert parts["loss"] == pytest.approx(parts["ce"] + 1e-4 * parts["kl"] + 20.0 * parts["macs_penalty"], rel=1e-4)
    after = pruner.state_dict()
    for prefix in ("encoder.", "generator.", "backbone.body.0."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix


def test_budget_penalty_variants() -> None:
    with pytest.raises(ValueError, match="budget_penalty='both'"):
        MetaConfig(budget_penalty="both")


def test_expected_macs_track_the_budget() -> None:
    """After a short meta-training the expected MACs ratio follows the requested r."""
    torch.manual_seed(0)
    pruner = StampPruner.create("small_cnn", 4, backbone_kwargs={"width": 8})
    opt = make_optimizer(pruner, lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for i in range(30):
        meta_train_step(pruner, [make_episode("color", gen, ways=4, shots=5, query=16) for _ in range(2)], opt, MetaConfig())
    with torch.no_grad():
        low = meta_batch_loss(pruner, _batch(1, 0.2), MetaConfig())[1]["expected_macs_ratio"]
        high = meta_batch_loss(pruner, _batch(1, 0.9), MetaConfig())[1]["expected_macs_ratio"]
    assert high - low > 0.2, (low, high)


def test_batch_task_norm_needs_a_meta_batch() -> None:
    pruner = StampPruner.create("small_cnn", 4, backbone_kwargs={"width": 8})
    with pytest.raises(ValueError, match="got 1 episode.s., expected at least 2 .episodes.per_step"):
        meta_train_step(pruner, _episode(), make_optimizer(pruner))
    v1 = StampPruner.create("small_cnn", 4, backbone_kwargs={"width": 8}, task_norm="running")
    assert meta_train_step(v1, _episode(), make_optimizer(v1))["loss"] > 0


EPISODES = 100
META_BATCH = 4
CROSS_RATIO = 0.1
#: own mask minus the other family's mask and minus the mean-summary mask, each averaged over the
#: two families (points of test accuracy); see the test's docstring for why 3.
MARGIN = 3.0
@pytest.fixture(scope="module")
def backbone_of_two_families():
    torch.manual_seed(0)
    return two_family_backbone(torch.Generator().manual_seed(0))


def _adapts(acc: dict[str, dict[str, float]]) -> bool:
    """The bar: averaged over the families, a task's own mask beats the other family's mask and the
    mean-summary mask by MARGIN points each."""
    own_other = sum(a["own"] - a["other"] for a in acc.values()) / len(acc)
    own_mean = sum(a["own"] - a["mean"] for a in acc.values()) / len(acc)
    return own_other >= MARGIN and own_mean >= MARGIN


@pytest.mark.slow
def test_own_masks_beat_other_tasks_masks_after_the_same_fine_tune(backbone_of_two_families, capsys) -> None:
    """Cross-evaluation on held-out tasks of two families that need different channels (hue vs
    orientation): after the same short fine-tune, a task's own mask beats the mask generated for the
    other family's task and the mask of the mean summary (the mean-embedding ablation).

    Channel generator, deployed objective, 100 episodes, r=0.1, 240 test images per family, one thread
    (tests/stamp_core/conftest.py). This test measured own / other / mean: colour 99.6 / 75.2 / 77.5, orientation
    77.7 / 71.7 / 64.0, i.e. own − other +15.2 and own − mean +17.9 averaged over families.

    How often this holds: ``bench_cross_evaluation --seeds 0 1 2 3 4 --ratio 0.1 --threads 1`` (backbone and
    meta-training seeds; session 17) gave own − other +25.2 / +7.2 / +19.6 / −4.7 / +10.7 and own − mean
    +13.2 / +8.4 / +15.9 / −5.2 / +8.7: four seeds of five adapt, and on seed 3 meta-training broke the colour
    mask (own 52.5 against 100.0 for the untrained generator's). This test is one passing configuration,
    a regression check of the mechanism, not an estimate of how often meta-training succeeds.

    Why MARGIN = 3: a paired difference between two masks on the same 240 images has a standard
    error of about 2 points when a tenth of the answers differ; averaged over the two families about
    1.5, so 3 points is two standard errors, well below the effects of the passing seeds.

    The bar must fail for pruners whose masks *differ between tasks but are wrong*, so it cannot pass on
    "the masks differ" alone:
    * a randomly initialised scorer (the same architecture, random output weights instead of trained ones;
      asserted to give the two families different masks): own / other 91.5 / 99.2 and 87.3 / 90.8;
    * the trained pruner handed *shuffled* task summaries (each task gets the other family's summary).

    Measured once, not part of the test (``bench_cross_evaluation`` reports it as ``untrained``): whether training
    beats where it started, the untrained generator's mask (its L1 base scores, 89.0 / 85.4 here). It does not reliably: own − start +1.5 here (colour +10.6, orientation
    −7.7), +6.1 / +19.1 / +10.8 / −25.2 / +7.2 on the five seeds above, −3.0 when this test ran on two threads.
    Until session 16 this was asserted at 3 points; the test passed or failed with the thread count a
    previous test had left behind. Nor do own masks beat torch-pruning's mean-normalised L1 mask, the
    benchmark's ``l1`` (90.4 / 87.7 here; ``bench_cross_evaluation``'s ``l1``): in this toy world a good shared allocation is hard to beat.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    pruner = StampPruner.create(copy.deepcopy(backbone_of_two_families), generator="channel")
    opt = make_optimizer(pruner, lr=1e-3, backbone_lr=1e-4)
    cfg = MetaConfig(objective="deployed", inner_steps=2)
    for _ in range(0, EPISODES, META_BATCH):
        batch = [make_episode(FAMILIES[int(torch.randint(2, (), generator=gen))], gen) for _ in range(META_BATCH)]
        meta_train_step(pruner, batch, opt, cfg)
    random = StampPruner.create(copy.deepcopy(backbone_of_two_families), generator="channel")
    with torch.no_grad():  # the scorer's output layer starts at zero (L1's mask): give it random weights instead
        for p in random.generator.scorer[-1].parameters():
            p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(7))

    tasks = {f: held_out_task(f, 1000 + k) for k, f in enumerate(FAMILIES)}
    own = {f: pruner.summarize(*tasks[f][:2]) for f in FAMILIES}
    trained = cross_evaluate(pruner, tasks, own, CROSS_RATIO)
    shuffled = cross_evaluate(pruner, tasks, {f: own[o] for f, o in zip(FAMILIES, reversed(FAMILIES))}, CROSS_RATIO)
    random_summaries = {f: random.summarize(*tasks[f][:2]) for f in FAMILIES}
    scrambled = cross_evaluate(random, tasks, random_summaries, CROSS_RATIO)
    with capsys.disabled():
        for name, acc in (("trained", trained), ("shuffled summaries", shuffled), ("random scorer", scrambled)):
            print(f"\n[cross-evaluation, {name}] " + "; ".join(
                f"{f}: own {a['own']:.1f} other {a['other']:.1f} mean {a['mean']:.1f}" for f, a in acc.items()))
    x, y = tasks[FAMILIES[0]][:2]
    assert random.generate(x, y, CROSS_RATIO, embedding=random_summaries[FAMILIES[0]]).kept != \
        random.generate(x, y, CROSS_RATIO, embedding=random_summaries[FAMILIES[1]]).kept
    assert _adapts(trained), trained
    assert not _adapts(shuffled), shuffled
    assert not _adapts(scrambled), scrambled


@pytest.mark.parametrize("inner_steps", [0, 2])
def test_gated_passes_leave_norm_statistics_alone(inner_steps: int) -> None:
    """Masked training passes must not move BatchNorm's running statistics: the encoder reads them
    in eval mode and pruned nets inherit them (v1 let them drift 5x in 80 resnet20 episodes)."""
    torch.manual_seed(0)
    pruner = StampPruner.create("small_cnn", 4, backbone_kwargs={"width": 8})
    buffers = {k: v.clone() for k, v in pruner.backbone.named_buffers()}
    momenta = [m.momentum for m in pruner.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    opt = make_optimizer(pruner)
    for seed in range(3):
        meta_train_step(pruner, _batch(seed), opt, MetaConfig(inner_steps=inner_steps))
    assert buffers and all(torch.equal(v, buffers[k]) for k, v in pruner.backbone.named_buffers())
    assert [m.momentum for m in pruner.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta


def test_deployed_objective_trains_the_mask_generate_returns() -> None:
    """objective="deployed": the forward pass uses exactly generate()'s calibrated mask (budget met
    without a penalty) and the scores still get gradients, straight through the hard gates."""
    from stamp_core.meta import hard_gates

    torch.manual_seed(0)
    pruner = StampPruner.create("small_cnn", 4, backbone_kwargs={"width": 8})
    ep = _episode(0, 0.3)
    pruner.eval()
    emb = pruner.embed(pruner.extract_features(ep.support_x), ep.support_y)
    probs = pruner.keep_probabilities(emb, 0.3)
    want = pruner.generate(ep.support_x, ep.support_y, macs_ratio=0.3, embedding=emb).kept
    got = [torch.nonzero(z).flatten().tolist() for z in hard_gates(pruner, probs, 0.3)]
    assert got == list(want.values())
    pruner.train()
    opt = make_optimizer(pruner)
    before = copy.deepcopy(pruner.state_dict())
    cfg = MetaConfig(objective="deployed", inner_steps=2)
    for seed in range(2):
        parts = meta_train_step(pruner, _batch(seed), opt, cfg)
    assert 0.27 <= parts["expected_macs_ratio"] <= 0.3 and parts["kl"] == 0.0
    # the keep probabilities' own expected MACs are measured; penalised only when asked
    assert parts["macs_penalty"] == pytest.approx((parts["soft_macs_ratio"] - 0.3) ** 2, rel=1e-4)
    assert parts["loss"] == parts["ce"]
    anchored = meta_train_step(pruner, _batch(5), opt, MetaConfig(objective="deployed", inner_steps=2, deployed_macs_penalty=True))
    assert anchored["loss"] == pytest.approx(anchored["ce"] + cfg.macs_weight * anchored["macs_penalty"], rel=1e-5)
    after = pruner.state_dict()
    for prefix in ("encoder.", "generator.heads.", "generator.a_uc.", "backbone.body.0."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    with pytest.raises(ValueError, match="objective='soft'. expected one of relaxed, deployed"):
        MetaConfig(objective="soft")
    with pytest.raises(ValueError, match="deployed_gradient='centred'. expected one of plain, budget_neutral"):
        MetaConfig(deployed_gradient="centred")


def test_budget_neutral_gradient_charges_marginal_macs_and_ignores_a_common_shift() -> None:
    """g -> g - lambda * m with lambda = sum(g) / sum(m): the MACs-weighted gradient sums to zero, so
    raising every keep probability together (invisible to the calibration) is not rewarded, and
    of two channels with the same benefit the one in the costlier group loses score."""
    from stamp_core.meta import budget_neutral_gradient, hard_gates

    torch.manual_seed(0)
    pruner = StampPruner.create("resnet20", 4)
    probs = [torch.rand(g.size, dtype=torch.float64, requires_grad=True) for g in pruner.structure.groups]
    hard = hard_gates(pruner, probs, 0.3)
    through = budget_neutral_gradient(pruner, probs, hard)
    sum(t.sum() for t in through).backward()  # the same benefit dCE/dz = 1 for every channel
    grads = torch.cat([p.grad for p in probs])
    assert grads.sum().item() == pytest.approx(0.0, abs=1e-9)
    per_group = [p.grad[0].item() for p in probs]
    counts = torch.tensor([float(z.sum()) for z in hard], dtype=torch.float64, requires_grad=True)
    (cost,) = torch.autograd.grad(pruner.structure.macs(counts), counts)
    # equal benefit: the ranking of the gradient is the reverse of the ranking of the marginal cost
    assert sorted(range(len(cost)), key=lambda g: per_group[g]) == sorted(range(len(cost)), key=lambda g: -cost[g].item())


def test_layer_es_raises_a_starved_layer_and_leaves_the_ranking_inside_layers(backbone_of_two_families: torch.nn.Module) -> None:
    """The ES surrogate's gradient is one number per layer (shared by its channels, so the ranking
    inside a layer stays the base scores'), and it is negative for a layer squeezed to one channel:
    keeping more of it lowers the deployed loss. Its value is the mean query CE of the scored masks."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    pruner = StampPruner.create(copy.deepcopy(backbone_of_two_families), generator="channel")
    ep = make_episode("orientation", gen, macs_ratio=0.5)
    logits = [torch.randn(g.size, dtype=torch.float64) for g in pruner.structure.groups]
    starved = 1
    logits[starved] -= 8.0  # ranked last: calibration keeps the one channel every group must keep
    logits = [lg.requires_grad_(True) for lg in logits]
    cfg = MetaConfig(objective="deployed", inner_steps=2, deployed_gradient="layer_es", es_pairs=8, es_sigma=1.0)
    surrogate, accuracy, hard = layer_es_surrogate(pruner, ep, cfg, [torch.sigmoid(lg) for lg in logits])
    assert float(hard[starved].sum()) == 1.0 and 0.0 <= accuracy <= 1.0 and surrogate.item() > 0.0
    surrogate.backward()
    per_layer = []
    for lg in logits:
        assert torch.allclose(lg.grad, lg.grad[0].expand_as(lg.grad), rtol=1e-6, atol=1e-12)
        per_layer.append(float(lg.grad[0]) * len(lg))
    assert per_layer[starved] < 0.0
    assert per_layer[starved] == min(per_layer)  # the starved layer is the one most worth growing
