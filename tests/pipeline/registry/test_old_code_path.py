"""Pruners logged while the model file was ``pipeline/pyfunc_model.py`` still load after the move.

Before pipeline/ was split into subpackages, ``log_pruner`` logged ``python_model=<checkout>/pipeline/
pyfunc_model.py``: the model's MLmodel names that path as ``model_code_path``, and the model
directory holds a copy of the file (``pyfunc_model.py``), the pruner artifact and ``code/stamp_core``.
These tests build such directories in ``tmp_path`` exactly as that ``log_pruner`` did (same
``mlflow.pyfunc.save_model`` arguments, a tiny random pruner saved as JSON + state_dict) and load
them through the public paths: :func:`pipeline.registry.load_pruner` and ``mlflow.pyfunc.load_model``.
The directory carries the model file as it was logged then (the moved module's code, which the move
left unchanged) and its MLmodel names the old path, which no longer exists in this checkout: MLflow
loads the model directory's own copy.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml

import pipeline.registry.pyfunc_model as moved
from pipeline.registry import PRUNER_ARTIFACT, generate_spec, load_pruner, pruner_signature
from stamp_core import StampPruner

REPO_ROOT = Path(__file__).resolve().parents[3]
OLD_MODEL_FILE = REPO_ROOT / "pipeline" / "pyfunc_model.py"  # what the old log_pruner passed (gone since)


def _tiny_pruner() -> StampPruner:
    torch.manual_seed(3)
    return StampPruner.create(
        "small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    )


def _images(n: int = 16) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def _model_file_then(tmp_path: Path) -> Path:
    """The model file as a pre-move checkout had it, at that checkout's ``pipeline/pyfunc_model.py``."""
    path = tmp_path / "old-checkout" / "pipeline" / "pyfunc_model.py"
    path.parent.mkdir(parents=True)
    shutil.copyfile(moved.__file__, path)
    return path


def _save_like_the_old_log_pruner(pruner: StampPruner, model_file: Path, tmp_path: Path) -> Path:
    """What ``pipeline/registry.py`` wrote before the move: artifacts, code path, signature, model file."""
    staging = tmp_path / "staging"
    pruner_dir = pruner.save(staging / PRUNER_ARTIFACT)  # pruner.json + pruner_state_dict.pt
    code = staging / "code" / "stamp_core"
    shutil.copytree(Path(__import__("stamp_core").__file__).parent, code,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    model_dir = tmp_path / "model"
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(model_file),
        artifacts={PRUNER_ARTIFACT: str(pruner_dir)},
        code_paths=[str(code)],
        signature=pruner_signature(),
        input_example=(_images(2), {"macs_ratio": 0.5}),
        pip_requirements=["mlflow", "torch", "torch-pruning", "numpy", "pandas"],
    )
    return model_dir


def _mlmodel(model_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((model_dir / "MLmodel").read_text())


def test_a_model_naming_the_old_code_path_loads_and_generates_the_same_spec(tmp_path: Path) -> None:
    pruner = _tiny_pruner()
    model_dir = _save_like_the_old_log_pruner(pruner, _model_file_then(tmp_path), tmp_path)
    # The old checkout stood where this one stands: its MLmodel names this repository's old path.
    meta = _mlmodel(model_dir)
    meta["flavors"]["python_function"]["model_code_path"] = str(OLD_MODEL_FILE)
    (model_dir / "MLmodel").write_text(yaml.safe_dump(meta))
    assert not OLD_MODEL_FILE.exists()

    flavor = _mlmodel(model_dir)["flavors"]["python_function"]
    assert flavor["model_code_path"] == str(OLD_MODEL_FILE)
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (model_dir / "pyfunc_model.py").is_file() and (model_dir / "code" / "stamp_core" / "spec.py").is_file()
    assert not list(model_dir.rglob("*.pkl"))

    images = _images()
    expected = generate_spec(pruner, images, None, 0.4)

    loaded = load_pruner(model_dir)  # no pyfunc: MLmodel -> artifact -> StampPruner.load
    assert generate_spec(loaded, images, None, 0.4).to_json() == expected.to_json()

    model = mlflow.pyfunc.load_model(str(model_dir))  # executes the model directory's pyfunc_model.py
    assert model.predict(images, params={"macs_ratio": 0.4}) == [expected.to_json()]


def test_the_model_file_imports_nothing_of_this_repository_but_stamp_core() -> None:
    """Each logged copy runs where only its code path (stamp_core) exists: keep it that way."""
    tree = ast.parse(Path(moved.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "typing", "mlflow", "numpy", "pandas", "torch", "stamp_core"}, roots
    assert Path(moved.__file__).name == "pyfunc_model.py"  # MLflow finds each model's copy by this name
