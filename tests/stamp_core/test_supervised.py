"""train_classifier: the learning-rate schedule does what its settings say, on any amount of data."""

import copy
import time

import pytest

import torch
import torch.nn.functional as F
from torch import nn

from stamp_core import TrainConfig, build_backbone, measure_latency, torch_threads, train_classifier


def test_a_one_step_fine_tune_takes_its_step_at_the_configured_rate() -> None:
    """40 images, batch 64, one epoch = one optimiser step (meta-validation's fine-tune). One-cycle
    took it at lr/25, so accuracy before and after fine-tuning came out identical; the step must
    equal a plain SGD step at ``lr``."""
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 4, width=8)
    x, y = torch.randn(40, 3, 32, 32), torch.arange(40) % 4
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, augment=False)
    manual = copy.deepcopy(model).train()
    train_classifier(model, x, y, cfg)
    opt = torch.optim.SGD(manual.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    F.cross_entropy(manual(x), y).backward()
    opt.step()
    for (name, got), want in zip(model.state_dict().items(), manual.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_long_runs_keep_the_one_cycle_warm_up() -> None:
    """From 10 steps on, the schedule warms up from lr/25 (what pretraining and the benchmark use)."""
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 4, width=8)
    seen: list[float] = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = spy
    try:
        train_classifier(model, torch.randn(80, 3, 32, 32), torch.arange(80) % 4, TrainConfig(epochs=1, batch_size=8, lr=0.05, augment=False))
    finally:
        torch.optim.SGD.step = original
    assert len(seen) == 10
    assert seen[0] == pytest.approx(0.05 / 25)
    assert max(seen) > 0.045 and seen[-1] < 0.01


def test_random_crop_flip_crops_each_image_at_its_own_offset_and_flips_some() -> None:
    from stamp_core import random_crop_flip

    x = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).reshape(64, 3, 8, 8)
    out = random_crop_flip(x, 2, True, torch.Generator().manual_seed(0), fill=-1.0)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    offsets, flips = set(), 0
    for i in range(64):
        windows = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert windows, f"image {i} is not a (flipped) window of its padded self"
        offsets.add(windows[0][:2])
        flips += windows[0][2]
    assert len(offsets) > 5 and 10 < flips < 54  # per-image offsets; about half flipped
    again = random_crop_flip(x, 2, True, torch.Generator().manual_seed(0), fill=-1.0)
    assert torch.equal(out, again)
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator().manual_seed(0)), x)


class _Sleeper(nn.Module):
    """A forward pass of a known duration."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_torch_threads_sets_the_count_inside_and_restores_it_after_an_error() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(other):
            assert torch.get_num_threads() == other
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads=0: expected a positive thread count or None"):
        with torch_threads(0):
            pass
    assert torch.get_num_threads() == before


def test_measure_latency_is_the_median_of_single_passes_and_keeps_the_mode() -> None:
    model = _Sleeper(0.02).train()
    seconds = measure_latency(model, (1, 4, 4), batch_size=2, repeats=5, warmup=1)
    assert 0.02 <= seconds < 0.1
    assert model.training and model.calls >= 1 + 5
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(model, (1, 4, 4), batch_size=2, repeats=0)
