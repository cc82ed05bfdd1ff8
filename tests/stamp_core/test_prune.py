"""The one prune path: mask -> surgery -> BatchNorm recalibration -> prototype head -> fine-tune."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from stamp_core import (
    StampPruner,
    TrainConfig,
    build_task_model,
    count_macs_params,
    prune_and_finetune,
    prune_for_task,
    recalibrate_batchnorm,
)
from tests.stamp_core._tasks import make_images

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def pruner() -> StampPruner:
    torch.manual_seed(0)
    return StampPruner.create("small_cnn", 6, backbone_kwargs={"width": 8}).eval()


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    y = torch.arange(48) % 3
    yt = torch.arange(30) % 3
    return make_images("color", y, gen), y, make_images("color", yt, gen), yt


def test_recalibrate_batchnorm_measures_the_targets_statistics_and_restores_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    bn = model[1]
    x = torch.randn(128, 3, 8, 8) * 3.0 + 2.0
    recalibrate_batchnorm(model, x, batch_size=64)
    with torch.no_grad():
        pre = model[0](x)
    torch.testing.assert_close(bn.running_mean, pre.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    # Cumulative average of the two equal batches' unbiased variances.
    halves = [pre[:64].var(dim=(0, 2, 3), unbiased=True), pre[64:].var(dim=(0, 2, 3), unbiased=True)]
    torch.testing.assert_close(bn.running_var, (halves[0] + halves[1]) / 2, rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.1 and not model.training
    # Eval-mode outputs are now normalised on the target: mean ~0 per channel before ReLU.
    with torch.no_grad():
        out = bn(pre)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-3


def test_build_task_model_prunes_a_copy_recalibrates_and_gives_a_prototype_head(pruner, task) -> None:
    x, y, _, _ = task
    before = {k: v.clone() for k, v in pruner.backbone.state_dict().items()}
    spec = pruner.generate(x, y, macs_ratio=0.4)
    model = build_task_model(pruner.backbone, spec, x, y)
    for k, v in pruner.backbone.state_dict().items():  # the weights given are never modified
        assert torch.equal(v, before[k]), k
    assert count_macs_params(model, SHAPE) == count_macs_params(pruner.build_pruned(spec, num_classes=3), SHAPE)
    assert model.classifier.out_features == 3 and not model.training
    # BatchNorm statistics are the task's: recomputing them on x changes nothing.
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    recalibrate_batchnorm(model, x)
    for n, b in model.named_buffers():
        if "running" in n:
            torch.testing.assert_close(b, stats[n], rtol=1e-5, atol=1e-5)
    # ... and they differ from the parent's (random-init parent: running stats 0 / 1).
    assert all(before[n].abs().max() == 0 for n in before if n.endswith("running_mean"))
    assert all(b.abs().max() > 1e-3 for n, b in model.named_buffers() if n.endswith("running_mean"))


def test_without_recalibration_the_parents_statistics_of_the_kept_channels_survive(pruner, task) -> None:
    x, y, _, _ = task
    model = build_task_model(pruner.backbone, None, x, y, recalibrate_bn=False)
    for n, b in model.named_buffers():
        if "running" in n:
            assert torch.equal(b, pruner.backbone.state_dict()[n]), n


def test_full_reference_goes_through_the_same_path(pruner, task) -> None:
    x, y, xt, yt = task
    res = prune_and_finetune(pruner.backbone, None, x, y, xt, yt, TrainConfig(epochs=1, batch_size=16, seed=0))
    assert res.spec is None
    fewer_classes = (6 - 3) * res.model.classifier.in_features  # only the head differs from the full net
    assert count_macs_params(res.model, SHAPE)[0] == count_macs_params(pruner.backbone, SHAPE)[0] - fewer_classes
    assert 0.0 <= res.accuracy <= 1.0 and len(res.history) == 1


def test_prune_for_task_is_generate_then_the_shared_path(pruner, task) -> None:
    x, y, xt, yt = task
    ft = TrainConfig(epochs=1, batch_size=16, seed=5)
    torch.manual_seed(0)
    a = prune_for_task(pruner, x, y, xt, yt, macs_ratio=0.3, finetune=ft)
    spec = pruner.generate(x, y, macs_ratio=0.3, num_classes=3)  # the head prune_and_finetune builds
    torch.manual_seed(0)
    b = prune_and_finetune(pruner.backbone, spec, x, y, xt, yt, ft)
    assert a.spec.kept == spec.kept
    # The spec counts the net returned (3-way head, not the backbone's 6) and meets the budget there.
    assert (a.spec.macs_pruned, a.spec.params_pruned) == count_macs_params(a.model, SHAPE)
    assert a.spec.macs_ratio <= 0.3
    assert (a.accuracy_before_finetune, a.accuracy) == (b.accuracy_before_finetune, b.accuracy)
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), n


def test_zero_epochs_keeps_the_prototype_head(pruner, task) -> None:
    x, y, xt, yt = task
    res = prune_and_finetune(pruner.backbone, pruner.generate(x, y, macs_ratio=0.5), x, y, xt, yt, TrainConfig(epochs=0))
    assert res.history == [] and res.accuracy == res.accuracy_before_finetune


def test_bad_task_is_refused(pruner, task) -> None:
    x, y, _, _ = task
    with pytest.raises(ValueError, match="expected the same, non-zero count"):
        build_task_model(pruner.backbone, None, x[:5], y[:4])


def test_curve_points_are_complete_fine_tunes_of_the_same_start(pruner, task) -> None:
    x, y, xt, yt = task
    spec = pruner.generate(x, y, macs_ratio=0.5)
    ft = TrainConfig(epochs=2, batch_size=16, seed=1)
    res = prune_and_finetune(pruner.backbone, spec, x, y, xt, yt, ft, curve_epochs=[1, 2, 0])
    assert sorted(res.curve) == [0, 1, 2]
    assert res.curve[0] == (res.accuracy_before_finetune, 0.0) and res.curve[2][0] == res.accuracy
    # The 1-epoch point is its own complete schedule: the same as a plain 1-epoch run.
    one = prune_and_finetune(pruner.backbone, spec, x, y, xt, yt, TrainConfig(epochs=1, batch_size=16, seed=1))
    assert res.curve[1][0] == one.accuracy
    with pytest.raises(ValueError, match="curve_epochs needs x_test"):
        prune_and_finetune(pruner.backbone, spec, x, y, finetune=ft, curve_epochs=[1])


def test_fine_tuned_net_carries_the_statistics_of_its_final_weights(pruner, task) -> None:
    x, y, xt, yt = task
    res = prune_and_finetune(pruner.backbone, pruner.generate(x, y, macs_ratio=0.5), x, y, xt, yt,
                             TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0))
    stats = {n: b.clone() for n, b in res.model.named_buffers() if "running" in n}
    recalibrate_batchnorm(res.model, x)  # measuring again on the same images changes nothing
    for n, b in res.model.named_buffers():
        if "running" in n:
            torch.testing.assert_close(b, stats[n], rtol=1e-5, atol=1e-5)
