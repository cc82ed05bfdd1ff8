"""StampPruner with ``generator: outcome``: one candidate per task and budget, chosen from the task's probe."""

from __future__ import annotations

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


def _pruner() -> StampPruner:
    torch.manual_seed(0)
    pruner = StampPruner.create(build_backbone("resnet20", 10), generator="outcome", candidates=CANDIDATES,
                                embed_dim=8, num_heads=2, num_inducing=2, hidden_dim=8)
    # A predictor that prefers uniform width on grayscale tasks and the tilted separability mask on colour ones.
    colour = FEATURE_NAMES.index("colourfulness")
    feats = torch.zeros(40, len(FEATURE_NAMES), dtype=torch.float64)
    feats[20:, colour] = 0.2
    feats += 1e-3 * torch.randn(feats.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rel = torch.zeros(40, 3, dtype=torch.float64)
    rel[:20, 1], rel[20:, 2] = 5.0, 5.0
    fitted = OutcomePredictor.fit(feats, torch.full((40,), 0.3, dtype=torch.float64), rel, CANDIDATES, FEATURE_NAMES, ridge=1e-3)
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
