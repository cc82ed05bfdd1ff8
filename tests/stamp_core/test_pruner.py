"""StampPruner.generate: budgets met on real pruned nets, determinism, bad input, persistence."""

import json

import numpy as np
import pytest
import torch

from stamp_core import PruneSpec, StampPruner, count_macs_params, list_backbones


@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(60, 3, 32, 32, generator=gen) * 2 - 1, torch.arange(60) % 5


@pytest.fixture(scope="module")
def pruners() -> dict[str, StampPruner]:
    torch.manual_seed(0)
    return {}


def _pruner(pruners: dict[str, StampPruner], name: str) -> StampPruner:
    if name not in pruners:
        pruners[name] = StampPruner.create(name, 10)
    return pruners[name]


@pytest.mark.parametrize("name", list_backbones())
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_real_macs_meet_budget(pruners, task, name: str, ratio: float) -> None:
    pruner = _pruner(pruners, name)
    spec = pruner.generate(*task, macs_ratio=ratio)
    model = pruner.build_pruned(spec)
    macs, params = count_macs_params(model, (3, 32, 32))
    full_macs, full_params = count_macs_params(pruner.backbone, (3, 32, 32))
    assert ratio - 0.03 <= macs / full_macs <= ratio
    assert (macs, params, full_macs, full_params) == (spec.macs_pruned, spec.params_pruned, spec.macs_full, spec.params_full)
    assert all(len(k) >= 1 for k in spec.kept.values())


def test_round_to_keeps_multiples(pruners, task) -> None:
    pruner = _pruner(pruners, "resnet20")
    spec = pruner.generate(*task, macs_ratio=0.5, round_to=8)
    for name, kept in spec.kept.items():
        assert len(kept) % 8 == 0 or len(kept) == spec.group_sizes[name]
    assert spec.macs_ratio <= 0.5


def test_generate_is_deterministic_and_order_invariant(pruners, task) -> None:
    pruner = _pruner(pruners, "small_cnn")
    x, y = task
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    a = pruner.generate(x, y, macs_ratio=0.3)
    assert pruner.generate(x, y, macs_ratio=0.3) == a
    assert pruner.generate(x[perm], y[perm], macs_ratio=0.3).kept == a.kept


def test_label_free_generation(pruners, task) -> None:
    spec = _pruner(pruners, "small_cnn").generate(task[0], None, macs_ratio=0.3)
    assert 0.27 <= spec.macs_ratio <= 0.3


def test_too_small_budget_is_refused(pruners, task) -> None:
    with pytest.raises(ValueError, match="below the smallest reachable ratio"):
        _pruner(pruners, "small_cnn").generate(*task, macs_ratio=1e-6)


@pytest.mark.parametrize(
    "images, labels, ratio, message",
    [
        (torch.empty(0, 3, 32, 32), None, 0.3, "empty"),
        (torch.zeros(4, 3, 32, 32), [0, 1, 2], 0.3, "labels have shape \\(3,\\) but there are 4 images"),
        (torch.zeros(4, 1, 32, 32), None, 0.3, "images have 1 channels: expected float images of shape \\(N, 3, H, W\\)"),
        (torch.zeros(4, 3, 16, 16), None, 0.3, "images are 16x16 pixels: expected .* >= 28"),
        (torch.full((4, 3, 32, 32), float("nan")), None, 0.3, "NaN or inf"),
        (torch.full((4, 3, 32, 32), float("inf")), None, 0.3, "NaN or inf"),
        (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), None, 0.3, "dtype torch.uint8.*prepare_images"),
        (torch.zeros(3, 32, 32), None, 0.3, "shape \\(3, 32, 32\\)"),
        ("not images", None, 0.3, "images is a str"),
        (torch.zeros(4, 3, 32, 32), [0.5, 1, 2, 3], 0.3, "integer class ids"),
        (torch.zeros(4, 3, 32, 32), [0, -1, 2, 3], 0.3, "negative"),
        (torch.zeros(4, 3, 32, 32), None, 0.0, "macs_ratio=0.0: expected a number in \\(0, 1\\]"),
        (torch.zeros(4, 3, 32, 32), None, 1.5, "macs_ratio=1.5"),
        (torch.zeros(4, 3, 32, 32), None, float("nan"), "macs_ratio=nan"),
        (torch.zeros(4, 3, 32, 32), None, "lots", "macs_ratio='lots'"),
    ],
)
def test_bad_input_is_refused(pruners, images, labels, ratio, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _pruner(pruners, "small_cnn").generate(images, labels, macs_ratio=ratio)


def test_numpy_input_matches_tensor_input(pruners, task) -> None:
    pruner = _pruner(pruners, "small_cnn")
    x, y = task
    assert pruner.generate(x.numpy(), y.numpy(), macs_ratio=0.3) == pruner.generate(x, y, macs_ratio=0.3)


def test_large_sets_are_subsampled_class_balanced(pruners) -> None:
    pruner = _pruner(pruners, "small_cnn")
    labels = torch.arange(1000) % 4
    idx = pruner.select_support(labels, 1000)
    counts = torch.bincount(labels[idx])
    assert len(idx) <= pruner.config.max_support
    assert counts.tolist() == [pruner.config.support_per_class] * 4


def test_save_load_round_trip(tmp_path, pruners, task) -> None:
    pruner = _pruner(pruners, "resnet20")
    pruner.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["pruner.json", "pruner_state_dict.pt"]
    again = StampPruner.load(tmp_path / "p")
    for (k, v), (k2, v2) in zip(pruner.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert again.generate(*task, macs_ratio=0.3) == pruner.generate(*task, macs_ratio=0.3)
    cfg = json.loads((tmp_path / "p" / "pruner.json").read_text())
    assert cfg["backbone"]["name"] == "resnet20"


def test_load_refuses_pickled_objects(tmp_path, pruners) -> None:
    """weights_only=True: a state dict file holding an arbitrary object does not load."""
    pruner = _pruner(pruners, "small_cnn")
    pruner.save(tmp_path / "p")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "p" / "pruner_state_dict.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        StampPruner.load(tmp_path / "p")


def test_load_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved StampPruner"):
        StampPruner.load(tmp_path / "nothing")


def test_build_pruned_new_head(pruners, task) -> None:
    pruner = _pruner(pruners, "small_cnn")
    model = pruner.build_pruned(pruner.generate(*task, macs_ratio=0.3), num_classes=3)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_spec_from_generate_round_trips(pruners, task) -> None:
    spec = _pruner(pruners, "vgg11").generate(*task, macs_ratio=0.3)
    assert PruneSpec.from_json(spec.to_json()) == spec
    assert spec.macs_ratio_target == 0.3 and spec.pruner_version


def test_load_refuses_weights_of_another_version(tmp_path, pruners) -> None:
    pruner = _pruner(pruners, "small_cnn")
    pruner.save(tmp_path / "p")
    state = torch.load(tmp_path / "p" / "pruner_state_dict.pt", weights_only=True)
    state["generator.extra.weight"] = torch.zeros(1)
    del state["generator.budget_shift.bias"]
    torch.save(state, tmp_path / "p" / "pruner_state_dict.pt")
    with pytest.raises(ValueError, match=r"do not match this stamp_core .*missing \['generator.budget_shift.bias'\], unexpected \['generator.extra.weight'\]"):
        StampPruner.load(tmp_path / "p")


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_first_mask_is_the_l1_mask(task, name: str) -> None:
    """A fresh pruner (score_init="l1") prunes exactly as group L1 with its global threshold does,
    at every budget and for any task; v1's equal start ("none") does not."""
    from stamp_core.baselines import score_l1, select_spec

    torch.manual_seed(3)
    pruner = StampPruner.create(name, 10)
    v1 = StampPruner.create(pruner.backbone, score_init="none")
    l1 = score_l1(pruner.backbone, pruner.structure)
    for ratio in (0.5, 0.3, 0.1):
        want = select_spec(l1, pruner.structure, pruner.backbone.config, ratio, normalize=True).kept
        assert pruner.generate(*task, macs_ratio=ratio).kept == want
        assert pruner.generate(task[0][:10].flip(0), task[1][:10], macs_ratio=ratio).kept == want
        assert v1.generate(*task, macs_ratio=ratio).kept != want


def test_score_init_is_validated_and_old_pruners_load_as_v1(tmp_path, task) -> None:
    with pytest.raises(ValueError, match="score_init='bn'. expected one of l1, none"):
        StampPruner.create("small_cnn", 10, score_init="bn")
    pruner = StampPruner.create("small_cnn", 10, score_init="none")
    pruner.save(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "pruner.json").read_text())
    del cfg["score_init"]  # written before the field existed
    (tmp_path / "p" / "pruner.json").write_text(json.dumps(cfg))
    again = StampPruner.load(tmp_path / "p")
    assert again.config.score_init == "none"
    assert again.generate(*task, macs_ratio=0.3) == pruner.generate(*task, macs_ratio=0.3)
