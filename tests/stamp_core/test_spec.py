"""Gates, groups and PruneSpec: a gated net with a hard mask equals the physically pruned net."""

import copy
import io
import json

import pytest
import torch

from stamp_core import ChannelGates, PruneSpec, SpecMismatchError, analyze_structure, build_backbone, count_macs_params, list_backbones


def _randomise_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics, so a removed channel's bias would show if it leaked."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.normal_(1.0, 0.3, generator=gen)
            m.bias.data.normal_(0.0, 0.3, generator=gen)


def _random_spec(model, structure, gen: torch.Generator) -> PruneSpec:
    kept = {}
    for g in structure.groups:
        mask = torch.rand(g.size, generator=gen) < 0.5
        mask[torch.randint(0, g.size, (1,), generator=gen)] = True
        kept[g.name] = mask.nonzero().flatten().tolist()
    counts = torch.tensor([len(kept[g.name]) for g in structure.groups])
    return PruneSpec(
        backbone=dict(model.config), input_shape=(3, 32, 32), kept=kept,
        group_sizes={g.name: g.size for g in structure.groups},
        macs_full=structure.macs_full, macs_pruned=int(structure.macs(counts)),
        params_full=structure.params_full, params_pruned=structure.params(counts),
    )


@pytest.mark.parametrize("name", list_backbones())
def test_gated_equals_physically_pruned(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    model = build_backbone(name, 10)
    _randomise_norms(model, gen)
    model.eval()
    structure = analyze_structure(model, (3, 32, 32))
    spec = _random_spec(model, structure, gen)
    x = torch.randn(8, 3, 32, 32, generator=gen)

    gates = ChannelGates(model, structure)
    with torch.no_grad(), gates.apply(spec.masks([g.name for g in structure.groups])):
        gated = model(x)
    gates.remove()
    pruned = PruneSpec.from_json(spec.to_json()).apply(copy.deepcopy(model)).eval()
    with torch.no_grad():
        physical = pruned(x)

    assert (gated - physical).abs().max().item() < 1e-4
    for group in structure.groups:
        assert pruned.get_submodule(group.name).out_channels == len(spec.kept[group.name])
        for gate_module in group.gate_modules:
            assert pruned.get_submodule(gate_module).num_features == len(spec.kept[group.name])
    macs, params = count_macs_params(pruned, (3, 32, 32))
    assert (macs, params) == (spec.macs_pruned, spec.params_pruned)
    assert pruned.classifier.out_features == 10


def test_pruned_weights_round_trip_through_state_dict() -> None:
    gen = torch.Generator().manual_seed(1)
    model = build_backbone("resnet20", 10).eval()
    structure = analyze_structure(model, (3, 32, 32))
    spec = _random_spec(model, structure, gen)
    pruned = spec.apply(copy.deepcopy(model)).eval()
    buf = io.BytesIO()
    torch.save(pruned.state_dict(), buf)
    buf.seek(0)
    rebuilt = spec.apply(build_backbone("resnet20", 10)).eval()
    rebuilt.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))


def test_spec_json_round_trip_is_exact() -> None:
    model = build_backbone("small_cnn", 10)
    structure = analyze_structure(model, (3, 32, 32))
    spec = _random_spec(model, structure, torch.Generator().manual_seed(2))
    spec.metadata = {"task": "x"}
    again = PruneSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(again.to_json()) == json.loads(spec.to_json())


def test_spec_for_other_backbone_is_refused() -> None:
    model = build_backbone("small_cnn", 10)
    spec = _random_spec(model, analyze_structure(model, (3, 32, 32)), torch.Generator().manual_seed(3))
    with pytest.raises(SpecMismatchError, match="spec is for backbone .*small_cnn.* but the model is .*resnet20"):
        spec.apply(build_backbone("resnet20", 10))
    pruned = spec.apply(build_backbone("small_cnn", 10))
    if any(len(v) < spec.group_sizes[k] for k, v in spec.kept.items()):
        with pytest.raises(SpecMismatchError, match="freshly built, unpruned backbone"):
            spec.apply(pruned)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["kept"].__setitem__(next(iter(d["kept"])), []), "keeps no channel"),
        (lambda d: d["kept"].__setitem__(next(iter(d["kept"])), [0, 0]), "sorted, unique"),
        (lambda d: d["kept"].__setitem__(next(iter(d["kept"])), [10_000]), "in \\[0, "),
        (lambda d: d.pop("macs_full"), "lacks macs_full"),
        (lambda d: d.__setitem__("surprise", 1), "unknown fields surprise"),
        (lambda d: d.__setitem__("spec_version", 99), "spec_version 99"),
    ],
)
def test_bad_spec_json(mutate, message: str) -> None:
    model = build_backbone("small_cnn", 10)
    spec = _random_spec(model, analyze_structure(model, (3, 32, 32)), torch.Generator().manual_seed(4))
    d = json.loads(spec.to_json())
    mutate(d)
    with pytest.raises(ValueError, match=message):
        PruneSpec.from_dict(d)


def test_spec_not_json() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        PruneSpec.from_json("{nope")


def test_spec_save_is_atomic(tmp_path) -> None:
    model = build_backbone("small_cnn", 10)
    spec = _random_spec(model, analyze_structure(model, (3, 32, 32)), torch.Generator().manual_seed(5))
    spec.save(tmp_path / "spec.json")
    assert PruneSpec.load(tmp_path / "spec.json") == spec
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]
