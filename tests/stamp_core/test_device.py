"""Device placement belongs to stamp_core: the cost model follows the pruner, inputs follow it, bf16 autocast.

No GPU here: the device paths are covered on CPU (and PyTorch's "meta" device, which every
module move supports) plus a scan that no code picks CUDA behind the caller's back.
"""

import ast
import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _tasks import make_episode
from stamp_core import MetaConfig, StampPruner, make_optimizer, meta_train_step

REPO = Path(__file__).resolve().parents[2]


def _pruner() -> StampPruner:
    torch.manual_seed(0)
    return StampPruner.create("small_cnn", 4, backbone_kwargs={"width": 8})


def _batch(seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [make_episode(f, gen, ways=4, shots=5, query=16, macs_ratio=0.4) for f in ("color", "orientation")]


def test_the_cost_model_follows_every_module_move() -> None:
    pruner = _pruner()
    assert pruner.device == pruner.structure.device == torch.device("cpu")
    macs_full = pruner.structure.macs_full
    pruner.to("meta")  # a device move without a GPU: every tensor of the pruner must follow
    assert pruner.device.type == "meta"
    tensors = [v for v in vars(pruner.structure).values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert pruner.structure.group_sizes.dtype == torch.float64  # MACs stay exact
    assert pruner.structure.macs_full == macs_full


def test_generate_takes_numpy_or_cpu_inputs_on_the_pruners_device() -> None:
    pruner = _pruner()
    images = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    labels = np.arange(16) % 4
    a = pruner.generate(images, labels, macs_ratio=0.5)
    b = pruner.generate(torch.from_numpy(images), torch.from_numpy(labels), macs_ratio=0.5)
    assert a.kept == b.kept and a.macs_pruned == b.macs_pruned <= 0.5 * a.macs_full


def test_bf16_autocast_meta_step_is_close_to_fp32_and_keeps_float32_weights() -> None:
    fp32, bf16 = _pruner(), _pruner()
    opt32, opt16 = make_optimizer(fp32), make_optimizer(bf16)
    torch.manual_seed(1)
    parts32 = meta_train_step(fp32, _batch(), opt32, MetaConfig())
    torch.manual_seed(1)
    parts16 = meta_train_step(bf16, _batch(), opt16, MetaConfig(precision="bf16"))
    assert all(np.isfinite(v) for v in parts16.values())
    # bf16 has an 8-bit mantissa: close to fp32, but not bit-identical (autocast really ran).
    assert parts16["ce"] == pytest.approx(parts32["ce"], rel=0.05)
    assert parts16["ce"] != parts32["ce"]
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in bf16.parameters())


def test_precision_is_validated() -> None:
    with pytest.raises(ValueError, match="precision='fp16': expected one of fp32, bf16"):
        MetaConfig(precision="fp16")


def _cuda_choices(path: Path, root: Path = REPO) -> list[str]:
    """``.cuda(...)`` calls and ``"cuda"`` literals used as a device, with their line (path relative to ``root``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            found.append(f"{path.relative_to(root)}:{node.lineno} .cuda()")
        if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                              and a.value.startswith("cuda") for a in node.args):
            found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)[:60]}")
    return found


def test_no_code_moves_to_cuda_behind_the_callers_back() -> None:
    files = [p for d in ("stamp_core", "pipeline", "jobs") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 30
    assert [hit for f in files for hit in _cuda_choices(f)] == []


def test_the_scan_finds_a_hidden_cuda_call(tmp_path: Path) -> None:
    """On a temporary copy of stamp_core with one module that moves tensors to CUDA: the repository stays untouched."""
    copy_root = tmp_path / "repo"
    shutil.copytree(REPO / "stamp_core", copy_root / "stamp_core", ignore=shutil.ignore_patterns("__pycache__"))
    bad = copy_root / "stamp_core" / "probe.py"
    bad.write_text("import torch\nx = torch.zeros(1).cuda()\ny = torch.zeros(1).to('cuda:0')\n")
    hits = [hit for f in sorted((copy_root / "stamp_core").rglob("*.py")) for hit in _cuda_choices(f, copy_root)]
    assert hits == ["stamp_core/probe.py:2 .cuda()", "stamp_core/probe.py:3 torch.zeros(1).to('cuda:0')"]


def test_meta_step_leaves_the_cost_model_where_the_gates_are() -> None:
    pruner = _pruner()
    before = copy.deepcopy(pruner.structure.group_sizes)
    meta_train_step(pruner, _batch(), make_optimizer(pruner), MetaConfig())
    assert pruner.structure.device == pruner.device and torch.equal(pruner.structure.group_sizes, before)
