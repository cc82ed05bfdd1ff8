"""The channel-aware generator: per-channel statistics, the shared scorer and task summaries."""

import json

import pytest
import torch

from stamp_core import ChannelMaskGenerator, StampPruner, TaskSummary, channel_statistics
from stamp_core.channel_generator import NUM_CHANNEL_STATS


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(40, 3, 32, 32, generator=gen) * 2 - 1, torch.arange(40) % 4


@pytest.fixture(scope="module")
def pruner() -> StampPruner:
    torch.manual_seed(0)
    return StampPruner.create("small_cnn", 10, generator="channel", embed_dim=32, hidden_dim=64, num_inducing=8)


def test_channel_responses_are_pooled_relu_outputs_of_the_gated_norms(pruner, task) -> None:
    """Group 0 of small_cnn is the first conv, gated after its BatchNorm: its response is what the
    next layer reads, averaged over positions; batching the pass does not change it."""
    x = task[0][:10]
    net = pruner.backbone.eval()
    with torch.no_grad():
        want = torch.relu(net.body[1](net.body[0](x))).mean((2, 3))
    _, responses = pruner.extract_features(x, channel_responses=True)
    _, batched = pruner.extract_features(x, batch_size=3, channel_responses=True)
    assert [r.shape for r in responses] == [(10, g.size) for g in pruner.structure.groups]
    torch.testing.assert_close(responses[0], want, rtol=1e-5, atol=1e-6)
    for a, b in zip(responses, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_channel_statistics_measure_level_spread_and_class_separability() -> None:
    labels = torch.arange(60) % 3
    noise = torch.rand(60, generator=torch.Generator().manual_seed(1))
    responses = torch.stack([
        labels.float(),                   # decided by the class: separability 1
        noise,                            # class means equal up to sampling: separability ~0
        torch.zeros(60),                  # dead channel: floored logs, no separability
        torch.full((60,), 2.0),           # constant: no spread
    ], dim=1)
    (stats,) = channel_statistics([responses], labels)
    assert stats.shape == (4, NUM_CHANNEL_STATS)
    assert stats[0, 2].item() == pytest.approx(1.0)
    assert stats[1, 2].item() < 0.1
    assert stats[2].tolist() == pytest.approx([torch.log(torch.tensor(1e-3)).item()] * 2 + [0.0], abs=1e-4)
    assert stats[3, 0].item() == pytest.approx(torch.log(torch.tensor(2.001)).item(), abs=1e-5)
    assert stats[3, 1].item() == pytest.approx(torch.log(torch.tensor(1e-3)).item(), abs=1e-4)
    (unlabelled,) = channel_statistics([responses], None)
    assert unlabelled[:, 2].abs().sum().item() == 0.0
    torch.testing.assert_close(unlabelled[:, :2], stats[:, :2])


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.1])
def test_fresh_channel_pruner_prunes_like_l1_for_every_task(pruner, task, ratio: float) -> None:
    """The scorer's output layer starts at zero: until meta-training moves it, the mask is L1's."""
    from stamp_core.baselines import score_l1, select_spec

    l1 = score_l1(pruner.backbone, pruner.structure)
    want = select_spec(l1, pruner.structure, pruner.backbone.config, ratio, normalize=True).kept
    assert pruner.generate(*task, macs_ratio=ratio).kept == want
    assert pruner.generate(task[0][:8].flip(1), task[1][:8], macs_ratio=ratio).kept == want


def test_scorer_reads_the_channels_of_the_task(pruner, task) -> None:
    """Once the scorer's output layer is non-zero, the mask follows the task's channel statistics
    (with the set embedding held fixed), and the same task gets the same mask."""
    moved = StampPruner.create(pruner.backbone, generator="channel", embed_dim=32, hidden_dim=64, num_inducing=8)
    torch.manual_seed(1)
    with torch.no_grad():
        moved.generator.scorer[-1].weight.normal_(std=1.0)
    x, y = task
    own, other = moved.summarize(x, y), moved.summarize(x.clamp(min=0) * 3, y)
    a = moved.generate(x, y, macs_ratio=0.3)
    assert moved.generate(x, y, macs_ratio=0.3, embedding=own) == a
    swapped = TaskSummary(own.embedding, other.channel_stats)
    assert moved.generate(x, y, macs_ratio=0.3, embedding=swapped).kept != a.kept


def test_channel_generator_needs_channel_statistics(pruner, task) -> None:
    emb = pruner.summarize(*task).embedding
    with pytest.raises(ValueError, match="reads per-channel statistics: pass a TaskSummary"):
        pruner.generate(*task, macs_ratio=0.3, embedding=emb)
    with pytest.raises(ValueError, match="pass channel_stats"):
        pruner.generator(emb, 0.3)
    with pytest.raises(ValueError, match="got costs for 1 groups: expected 2"):
        ChannelMaskGenerator([4, 8], [0.1])
    with pytest.raises(ValueError, match="generator='perlayer'. expected one of faithful, channel"):
        StampPruner.create("small_cnn", 10, generator="perlayer")


def test_mean_summary_averages_embeddings_and_channel_statistics(pruner, task) -> None:
    x, y = task
    tasks = [(x[:20], y[:20]), (x[20:], y[20:])]
    mean = pruner.mean_embedding(tasks)
    singles = [pruner.summarize(*t) for t in tasks]
    torch.testing.assert_close(mean.embedding, (singles[0].embedding + singles[1].embedding) / 2)
    for g, stats in enumerate(mean.channel_stats):
        torch.testing.assert_close(stats, (singles[0].channel_stats[g] + singles[1].channel_stats[g]) / 2)
    # the ablation's mask ignores the images it is given
    assert pruner.generate(x, y, macs_ratio=0.3, embedding=mean) == pruner.generate(x * 0.5, y, macs_ratio=0.3, embedding=mean)


def test_channel_pruner_save_load_round_trip(tmp_path, task) -> None:
    """The scorer's last layer starts at zero (masks = the base scores'); give it weights, so that a
    round trip that lost them would change the mask."""
    torch.manual_seed(0)
    trained = StampPruner.create("small_cnn", 10, generator="channel", embed_dim=32, hidden_dim=64, num_inducing=8)
    untrained_mask = trained.generate(*task, macs_ratio=0.3)
    with torch.no_grad():
        for p in trained.generator.scorer[-1].parameters():
            p.normal_(0.0, 2.0)
    mask = trained.generate(*task, macs_ratio=0.3)
    assert mask != untrained_mask
    trained.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "pruner.json").read_text())["generator"] == "channel"
    again = StampPruner.load(tmp_path / "p")
    assert isinstance(again.generator, ChannelMaskGenerator)
    assert again.generate(*task, macs_ratio=0.3) == mask


def test_task_summary_stack_and_mean_need_summaries() -> None:
    s = TaskSummary(torch.ones(3), [torch.ones(2, NUM_CHANNEL_STATS)])
    batch = TaskSummary.stack([s, s])
    assert batch.embedding.shape == (2, 3) and batch.channel_stats[0].shape == (2, 2, NUM_CHANNEL_STATS)
    with pytest.raises(ValueError, match="needs at least one summary"):
        TaskSummary.mean([])
