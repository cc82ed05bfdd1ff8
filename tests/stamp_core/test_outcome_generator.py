"""StampPruner with ``generator: outcome``: one candidate per task and budget, chosen from the task's probe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stamp_core import StampPruner, build_backbone
from stamp_core.candidates import FEATURE_NAMES, build_candidate, probe_task
from stamp_core.outcome_predictor import OutcomePredictor
from tests.stamp_core._tasks import make_images

CANDIDATES = ["l1", "uniform", "separability_in_tilt+1"]


def _task(family: str, gray: bool = False, classes: int = 4, per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = make_images(family, y, gen)
    return (x.mean(1, keepdim=True).expand_as(x).contiguous() if gray else x), y


def _pruner(candidates: list[str] = CANDIDATES) -> StampPruner:
    torch.manual_seed(0)
    pruner = StampPruner.create(build_backbone("resnet20", 10), generator="outcome", candidates=candidates,
                                embed_dim=8, num_heads=2, num_inducing=2, hidden_dim=8)
    # A predictor that prefers uniform width on grayscale tasks and the tilted separability mask on colour ones.
    colour = FEATURE_NAMES.index("colourfulness")
    feats = torch.zeros(40, len(FEATURE_NAMES), dtype=torch.float64)
    feats[20:, colour] = 0.2
    feats += 1e-3 * torch.randn(feats.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rel = torch.zeros(40, 3, dtype=torch.float64)
    rel[:20, 1], rel[20:, 2] = 5.0, 5.0
    fitted = OutcomePredictor.fit(feats, torch.full((40,), 0.3, dtype=torch.float64), rel, candidates, FEATURE_NAMES, ridge=1e-3)
    pruner.generator.predictor.load_state_dict(fitted.state_dict())
    return pruner.eval()


def test_it_chooses_per_task_and_builds_that_candidate_exactly() -> None:
    pruner = _pruner()
    gray_x, gray_y = _task("orientation", gray=True)
    colour_x, colour_y = _task("color")
    gray = pruner.generate(gray_x, gray_y, macs_ratio=0.3)
    colour = pruner.generate(colour_x, colour_y, macs_ratio=0.3)
    assert gray.metadata["candidate"] == "uniform" and colour.metadata["candidate"] == "separability_in_tilt+1"
    assert gray.metadata["generator"] == "outcome" and colour.macs_pruned <= 0.3 * colour.macs_full
    # The same mask as building the candidate from a probe of the same sample.
    probe = probe_task(pruner.backbone, pruner.structure, colour_x, colour_y)
    direct = build_candidate("separability_in_tilt+1", probe, pruner.structure, pruner.backbone.config, 0.3)
    assert direct.kept == colour.kept
    assert pruner.generate(colour_x, colour_y, macs_ratio=0.3, round_to=4).kept_counts() != colour.kept_counts()


def test_a_synflow_candidate_is_built_from_the_backbones_synflow_scores() -> None:
    pruner = _pruner(["l1", "uniform", "separability_in_synflowtilt+1"])
    colour_x, colour_y = _task("color")
    spec = pruner.generate(colour_x, colour_y, macs_ratio=0.3)
    assert spec.metadata["candidate"] == "separability_in_synflowtilt+1"
    probe = probe_task(pruner.backbone, pruner.structure, colour_x, colour_y)
    direct = build_candidate("separability_in_synflowtilt+1", probe, pruner.structure, pruner.backbone.config, 0.3)
    assert direct.kept == spec.kept
    assert [s.kept for s in pruner.propose(colour_x, colour_y, 0.3, k=2)][0] == spec.kept


def test_the_mean_embedding_is_one_choice_for_every_task() -> None:
    pruner = _pruner()
    tasks = [_task("orientation", gray=True), _task("color")]
    mean = pruner.mean_embedding(tasks)
    specs = [pruner.generate(x, y, macs_ratio=0.3, embedding=mean) for x, y in tasks]
    assert specs[0].metadata["candidate"] == specs[1].metadata["candidate"]


def test_it_round_trips_through_save_and_load(tmp_path: Path) -> None:
    pruner = _pruner()
    loaded = StampPruner.load(pruner.save(tmp_path / "p")).eval()
    x, y = _task("color")
    assert loaded.config.candidates == CANDIDATES and loaded.config.generator == "outcome"
    assert loaded.generate(x, y, macs_ratio=0.5).kept == pruner.generate(x, y, macs_ratio=0.5).kept
    for a, b in zip(loaded.generator.l1_scores(), pruner.generator.l1_scores()):
        assert torch.equal(a, b) and a.abs().sum() > 0  # the backbone's L1 scores travel with the pruner


def test_labels_are_required_and_keep_probabilities_refused() -> None:
    pruner = _pruner()
    x, _ = _task("color")
    with pytest.raises(ValueError, match="outcome generator reads class labels"):
        pruner.generate(x, None, macs_ratio=0.3)
    with pytest.raises(ValueError, match="chooses whole masks"):
        pruner.keep_probabilities(torch.zeros(len(FEATURE_NAMES)), 0.3)
    with pytest.raises(ValueError, match="generator='outcome' needs candidates"):
        StampPruner.create(build_backbone("small_cnn", 4, width=8), generator="outcome")


def test_propose_ranks_whole_masks_and_generate_deploys_the_first() -> None:
    pruner = _pruner()
    x, y = _task("color")
    proposed = pruner.propose(x, y, macs_ratio=0.3, k=3)
    names = [s.metadata["candidate"] for s in proposed]
    assert names[0] == "separability_in_tilt+1" and sorted(names) == sorted(CANDIDATES)
    assert proposed[0].kept == pruner.generate(x, y, macs_ratio=0.3).kept
    assert len(pruner.propose(x, y, macs_ratio=0.3, k=1)) == 1
    channel = StampPruner.create(build_backbone("small_cnn", 4, width=8), generator="channel")
    with pytest.raises(ValueError, match="proposing several masks needs a pruner with generator 'outcome'"):
        channel.propose(x, y, 0.3, 2)


def test_selection_split_holds_out_a_share_of_every_class() -> None:
    from stamp_core.selection import selection_split

    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, held = selection_split(y, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(y)))
    assert torch.bincount(y[held], minlength=3).tolist() == [2, 1, 0]  # a single image is only fitted on
    assert selection_split(y, 0.2, seed=0)[1].tolist() == held.tolist() != selection_split(y, 0.2, seed=1)[1].tolist()
    with pytest.raises(ValueError, match=r"fraction=1.0: expected a share in \(0, 1\)"):
        selection_split(y, 1.0, 0)


def test_select_mask_keeps_the_candidate_that_scores_best_on_the_held_out_share() -> None:
    from stamp_core import TrainConfig
    from stamp_core.selection import select_mask

    pruner = _pruner()
    x, y = _task("color", per_class=15)
    chosen = select_mask(pruner, x, y, 0.3, k=3, finetune=TrainConfig(epochs=1, batch_size=32, lr=0.01), seed=0)
    assert list(chosen.scores) == [s.metadata["candidate"] for s in pruner.propose(x, y, 0.3, 3)]
    assert chosen.one_pass == "separability_in_tilt+1" and chosen.split_images == 12  # 3 of 15 per class
    best = max(chosen.scores.values())
    assert chosen.scores[chosen.spec.metadata["candidate"]] == best
    first_best = next(n for n, v in chosen.scores.items() if v == best)  # ties keep the earlier (better-ranked) one
    assert chosen.spec.metadata["candidate"] == first_best
    with pytest.raises(ValueError, match="k=0: expected a positive number"):
        select_mask(pruner, x, y, 0.3, k=0, finetune=TrainConfig(epochs=1))


def test_select_mask_proposes_from_the_summary_it_is_given() -> None:
    """``stamp prune --select`` hands over the summary its one-pass mask came from: the first proposal is that mask."""
    from stamp_core import TrainConfig
    from stamp_core.selection import select_mask

    pruner = _pruner()
    x, y = _task("color", per_class=15)
    other = pruner.summarize(*_task("orientation", per_class=15))
    own_order = [s.metadata["candidate"] for s in pruner.propose(x, y, 0.3, 3)]
    other_order = [s.metadata["candidate"] for s in pruner.propose(x, y, 0.3, 3, embedding=other)]
    assert other_order != own_order  # else this test could not tell the summaries apart
    chosen = select_mask(pruner, x, y, 0.3, k=3, finetune=TrainConfig(epochs=1, batch_size=32, lr=0.01), seed=0,
                         embedding=other)
    assert list(chosen.scores) == other_order
    assert chosen.one_pass == pruner.generate(x, y, macs_ratio=0.3, embedding=other).metadata["candidate"]


def test_a_task_with_more_classes_than_the_sample_holds_keeps_many_images_of_fewer_classes() -> None:
    """242 classes and a 400-image cap: one or two images per class would make every channel look 'separable'
    (by chance, (classes - 1) / (images - 1) of a channel's variance is explained by the class); the outcome
    generator reads as many images per class as its predictor was fitted on (support_per_class, 20), or all a
    class holds if fewer, of an evenly spread subset of the classes, and still counts 242."""
    pruner = _pruner()
    assert (pruner.config.support_per_class, pruner.config.max_support) == (20, 400)
    y = torch.arange(242).repeat_interleave(16)  # Omniglot's shape: 16 drawings of each character
    idx = pruner.select_support(y, len(y), min_per_class=20)
    assert len(idx) == 400 and set(torch.bincount(y[idx]).tolist()) <= {0, 16} and y[idx].unique().numel() == 25
    y = torch.arange(242).repeat_interleave(3)
    x = make_images("color", y % 6, torch.Generator().manual_seed(0))
    idx = pruner.select_support(y, len(y), min_per_class=20)
    assert len(idx) == 399 and torch.bincount(y[idx]).max() == 3 and y[idx].unique().numel() == 133
    assert len(pruner.select_support(y, len(y))) == 242  # the other generators: one image of every class
    summary = pruner.summarize(x, y)
    features = dict(zip(FEATURE_NAMES, summary.embedding.tolist()))
    assert features["log_classes"] == pytest.approx(math.log(242), abs=1e-5)
    assert features["log_per_class"] == pytest.approx(math.log(3), abs=1e-5)
    assert 0.0 < features["mid_separability"] < 1.0
