"""stamp_core.calibration: a mask meets its MACs budget on the net a task deploys (the task's classifier)."""

from __future__ import annotations

import pytest
import torch

from stamp_core import build_backbone, count_macs_params
from stamp_core.calibration import calibrate_masks
from stamp_core.groups import PrunableStructure, analyze_structure

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def structure() -> PrunableStructure:
    return analyze_structure(build_backbone("resnet20", num_classes=100), SHAPE)


@pytest.mark.parametrize("num_classes", [4, 242])
def test_with_classifier_outputs_costs_the_net_built_with_that_head(structure: PrunableStructure,
                                                                    num_classes: int) -> None:
    task = structure.with_classifier_outputs(num_classes)
    assert (task.macs_full, task.params_full) == count_macs_params(build_backbone("resnet20", num_classes=num_classes), SHAPE)
    assert structure.macs_full == count_macs_params(build_backbone("resnet20", num_classes=100), SHAPE)[0]  # unchanged


def test_with_classifier_outputs_refuses_a_bad_class_count(structure: PrunableStructure) -> None:
    with pytest.raises(ValueError, match="num_classes=0: expected a positive integer"):
        structure.with_classifier_outputs(0)


def _deployed_ratio(kept: list[list[int]], task: PrunableStructure) -> float:
    counts = torch.tensor([len(k) for k in kept], dtype=torch.float64)
    return task.macs(counts).item() / task.macs_full


def test_the_budget_holds_with_the_tasks_classifier(structure: PrunableStructure) -> None:
    """Omniglot's 242 classes on a 100-class backbone: calibrated on the backbone's head, masks that keep the
    last stage wide overshoot the budget once the task's head is attached (benchmark rows showed 0.1%)."""
    task = structure.with_classifier_outputs(242)
    over_without = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        # Later groups score higher, so the last stage (which feeds the classifier) stays wide.
        scores = [torch.rand(grp.size, generator=g) + i / structure.num_groups for i, grp in enumerate(structure.groups)]
        for r in (0.5, 0.3, 0.1):
            assert _deployed_ratio(calibrate_masks(scores, structure, r, num_classes=242), task) <= r
            over_without += _deployed_ratio(calibrate_masks(scores, structure, r), task) > r
    assert over_without > 0  # without the task's head the same scores overshoot: the case is exercised
