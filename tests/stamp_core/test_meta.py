"""Meta-training: the step updates what it should, budgets are learned, masks adapt to the task."""

import copy

import pytest
import torch

from _tasks import make_episode, make_images
from stamp_core import (MetaConfig, jaccard_distance, StampPruner, TrainConfig, build_backbone, make_optimizer, meta_batch_loss, meta_train_step,
                        train_classifier)


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


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_adapt_to_the_task_family(seed: int, capsys) -> None:
    """Two task families that need different channels (hue vs orientation) get clearly different
    masks at r=0.3, while two samples of one task get (near) identical masks.

    Measured with this test (small_cnn width 16, 100 episodes): across-family Jaccard distance
    0.41 / 0.66 / 0.40 for seeds 0 / 1 / 2, within-task 0.000 on every seed. Before the generator
    standardised embeddings against the running task mean, seeds 1 and 2 gave 0.0 (one shared mask).
    Known weakness: continued to 200 episodes, some seeds still drift back to a shared mask (seed 2:
    0.03; seeds 0 / 1: 0.32 / 0.66) as keep probabilities saturate and the raw embeddings of the two
    families converge.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(12).repeat(150)
    x = torch.cat([make_images("color", labels[:900] % 6, gen), make_images("orientation", labels[900:] % 6, gen)])
    y = torch.cat([labels[:900] % 6, 6 + labels[900:] % 6])
    backbone = build_backbone("small_cnn", 12, width=16)
    train_classifier(backbone, x, y, TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=False))
    pruner = StampPruner.create(backbone)
    opt = make_optimizer(pruner, lr=1e-3, backbone_lr=1e-4)
    families = ["color", "orientation"]
    for i in range(0, EPISODES, META_BATCH):
        batch = [make_episode(families[int(torch.randint(2, (), generator=gen))], gen) for _ in range(META_BATCH)]
        meta_train_step(pruner, batch, opt, MetaConfig())

    def kept(family: str, sample_seed: int) -> dict[str, list[int]]:
        g = torch.Generator().manual_seed(sample_seed)
        sy = torch.arange(6).repeat_interleave(20)
        return pruner.generate(make_images(family, sy, g), sy, macs_ratio=0.3).kept

    c1, c2, o1, o2 = kept("color", 101), kept("color", 102), kept("orientation", 101), kept("orientation", 102)
    within = max(jaccard_distance(c1, c2), jaccard_distance(o1, o2))
    across = min(jaccard_distance(c1, o1), jaccard_distance(c2, o2))
    with capsys.disabled():
        print(f"\n[adaptivity seed {seed}] Jaccard distance across families {across:.3f}, within a task {within:.3f}")
    assert within <= 0.05
    assert across >= 0.2


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
    assert 0.27 <= parts["expected_macs_ratio"] <= 0.3 and parts["kl"] == parts["macs_penalty"] == 0.0
    after = pruner.state_dict()
    for prefix in ("encoder.", "generator.heads.", "generator.a_uc.", "backbone.body.0."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    with pytest.raises(ValueError, match="objective='soft'. expected one of relaxed, deployed"):
        MetaConfig(objective="soft")
