"""Every mask meets its MACs budget on the net a task deploys (the task's classifier): calibration, criteria,
candidates."""

from __future__ import annotations

import pytest
import torch

from stamp_core import build_backbone, count_macs_params, task_classes
from stamp_core.baselines import ScoringInput, select_spec, spec_by_criterion
from stamp_core.calibration import calibrate_masks
from stamp_core.candidates import TaskProbe, build_candidate
from stamp_core.groups import PrunableStructure, analyze_structure, score_l1

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
        scores = _last_stage_first(structure, seed)
        for r in (0.5, 0.3, 0.1):
            assert _deployed_ratio(calibrate_masks(scores, task, r), task) <= r
            over_without += _deployed_ratio(calibrate_masks(scores, structure, r), task) > r
    assert over_without > 0  # without the task's head the same scores overshoot: the case is exercised


def _last_stage_first(structure: PrunableStructure, seed: int) -> list[torch.Tensor]:
    """Scores that keep the last stage (which feeds the classifier) wide: the case a bigger head overshoots."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(grp.size, generator=g) + i / structure.num_groups for i, grp in enumerate(structure.groups)]


def test_select_spec_meets_and_records_the_budget_of_the_deployed_net(structure: PrunableStructure) -> None:
    config = build_backbone("resnet20", num_classes=100).config
    deployed = count_macs_params(build_backbone("resnet20", num_classes=242), SHAPE)
    over_without = 0
    for seed in range(10):
        scores = _last_stage_first(structure, seed)
        for r in (0.5, 0.1):
            spec = select_spec(scores, structure, config, r, num_classes=242)
            assert (spec.macs_full, spec.params_full) == deployed  # counted with the task's head
            assert spec.macs_ratio <= r
            assert spec.backbone == config  # the kept indices still refer to the backbone as given
            plain = select_spec(scores, structure, config, r)
            over_without += _deployed_ratio([plain.kept[g.name] for g in structure.groups],
                                            structure.with_classifier_outputs(242)) > r
    assert over_without > 0


def test_criteria_and_candidates_calibrate_on_the_tasks_head(structure: PrunableStructure) -> None:
    """The benchmark's baselines and the outcome generator's candidates meet the budget on the net the task
    deploys (its head from the labels), like the pruner's own mask."""
    model = build_backbone("resnet20", num_classes=100)
    y = torch.arange(242)
    inp = ScoringInput(model, structure, torch.zeros(242, *SHAPE), y, 0.3)
    spec = spec_by_criterion("l1", inp, model.config)
    assert spec.macs_full == count_macs_params(build_backbone("resnet20", num_classes=task_classes(y)), SHAPE)[0]
    assert spec.macs_ratio <= 0.3
    probe = TaskProbe(l1=score_l1(model, structure), activation=_last_stage_first(structure, 0),
                      separability=_last_stage_first(structure, 1), features={})
    for name in ("l1", "uniform", "separability_in_tilt+1"):
        cand = build_candidate(name, probe, structure, model.config, 0.1, num_classes=242)
        assert cand.macs_full == spec.macs_full and cand.macs_ratio <= 0.1, name
    assert build_candidate("l1", probe, structure, model.config, 0.1).macs_full == structure.macs_full


def test_task_classes_is_the_largest_label_plus_one() -> None:
    assert task_classes(torch.tensor([0, 4, 2])) == 5  # a class absent from the sample keeps its output
    with pytest.raises(ValueError, match="got no labels"):
        task_classes(torch.tensor([], dtype=torch.long))
