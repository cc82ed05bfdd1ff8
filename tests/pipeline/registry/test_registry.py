"""pipeline.registry against a real MLflow server (sqlite backend, artifacts on SeaweedFS S3).

Each module registers under its own model name: the session's server is shared with other test
modules, and aliases on a shared name would make results depend on test order.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.plots import plot_accuracy_vs_macs, plot_kept_fractions, plot_training_curves
from pipeline.registry import (
    RegisteredPruner,
    RegistryError,
    get_version_by_alias,
    list_versions,
    load_pruner,
    log_pruner,
    promote_if_better,
    set_alias,
)
from pipeline.stack import procs
from stamp_core import PruneSpec, StampPruner, build_backbone_from_config, count_macs_params

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[3]


def tiny_pruner(seed: int) -> StampPruner:
    torch.manual_seed(seed)
    return StampPruner.create(
        "small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    )


def same_weights(a: StampPruner, b: StampPruner) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def model_name() -> str:
    return f"stamp-pruner-test-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def champion(mlflow_server: str, model_name: str) -> tuple[StampPruner, RegisteredPruner]:
    """Version 1 of the module's model, promoted to champion (there was none)."""
    pruner = tiny_pruner(0)
    spec = pruner.generate(torch.rand(8, 3, 32, 32) * 2 - 1, macs_ratio=0.5)
    reg = log_pruner(
        pruner,
        name=model_name,
        metrics={"meta_val_accuracy": 0.60},
        params={"backbone": "small_cnn", "width": 8},
        lineage={
            "catalog_hash": "c" * 64,
            "source_datasets": ["stripes", "shapes"],
            "config": {"lr": 1e-3, "s3": {"aws_secret_access_key": "do-not-log-me"}},
        },
        plots={
            "kept": plot_kept_fractions({"stripes": spec}),
            "accuracy_vs_macs": plot_accuracy_vs_macs({"stamp": [(0.5, 0.8), (0.3, 0.7)]}),
            "training": plot_training_curves([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]),
        },
    )
    assert promote_if_better(model_name, reg.version, "meta_val_accuracy") is True
    return pruner, reg


def test_log_registers_version_with_lineage_tags(champion: tuple[StampPruner, RegisteredPruner], model_name: str) -> None:
    from mlflow import MlflowClient

    _, reg = champion
    assert reg.name == model_name and reg.version == "1"
    client = MlflowClient()
    tags = client.get_model_version(model_name, reg.version).tags
    assert tags["lineage.catalog_hash"] == "c" * 64
    assert tags["lineage.source_datasets"] == "stripes,shapes"
    assert len(tags["lineage.config_hash"]) == 64
    assert float(tags["metric.meta_val_accuracy"]) == pytest.approx(0.60)
    assert tags["stamp.code_version"]  # a git sha here, the package version elsewhere
    assert tags["stamp.backbone"] == "small_cnn"
    run = client.get_run(reg.run_id)
    assert run.data.metrics["meta_val_accuracy"] == pytest.approx(0.60)
    assert run.data.params["width"] == "8"
    listed = {f.path for f in client.list_artifacts(reg.run_id, "plots")}
    assert listed == {"plots/kept.png", "plots/accuracy_vs_macs.png", "plots/training.png"}
    config_path = client.download_artifacts(reg.run_id, "lineage/config.json")
    config_text = Path(config_path).read_text()
    assert "do-not-log-me" not in config_text and json.loads(config_text)["lr"] == 1e-3
    assert all("do-not-log-me" not in v for v in list(tags.values()) + list(run.data.tags.values()))


def test_fresh_process_pyfunc_predict_meets_budget(champion: tuple[StampPruner, RegisteredPruner], model_name: str, tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (24, 28, 28, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    code = (
        "import sys, numpy as np, mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{model_name}@champion')\n"
        f"images = np.load({str(tmp_path / 'images.npy')!r}, allow_pickle=False)\n"
        "out = model.predict(images, params={'macs_ratio': 0.3})\n"
        "assert isinstance(out, list) and len(out) == 1, out\n"
        "sys.stdout.write('SPEC=' + out[0])\n"
    )
    # The server proxies artifacts: a client needs no S3 credentials of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = PruneSpec.from_json(proc.stdout.split("SPEC=", 1)[1])
    model = spec.apply(build_backbone_from_config(spec.backbone))
    macs_pruned, _ = count_macs_params(model, spec.input_shape)
    macs_full, _ = count_macs_params(build_backbone_from_config(spec.backbone), spec.input_shape)
    assert macs_pruned == spec.macs_pruned
    assert macs_pruned / macs_full <= 0.3
    # Same images, same budget, in this process: the registered model is the logged pruner.
    pruner, _ = champion
    from pipeline.registry import generate_spec

    assert generate_spec(pruner, images, None, 0.3).kept == spec.kept


@pytest.mark.parametrize("form", ["alias", "version", "latest", "run", "logged"])
def test_load_pruner_equals_original(champion: tuple[StampPruner, RegisteredPruner], model_name: str, form: str) -> None:
    pruner, reg = champion
    uri = {
        "alias": f"models:/{model_name}@champion",
        "version": f"models:/{model_name}/{reg.version}",
        "latest": f"models:/{model_name}/latest",
        "run": f"runs:/{reg.run_id}/pruner",
        "logged": reg.model_uri,
    }[form]
    loaded = load_pruner(uri)
    assert type(loaded) is StampPruner
    assert same_weights(loaded, pruner)
    assert loaded.config.backbone == pruner.config.backbone


def test_promote_if_better_moves_champion_only_on_improvement(champion: tuple[StampPruner, RegisteredPruner], model_name: str) -> None:
    _, first = champion
    worse = log_pruner(tiny_pruner(1), name=model_name, metrics={"meta_val_accuracy": 0.55})
    assert promote_if_better(model_name, worse.version, "meta_val_accuracy") is False
    assert get_version_by_alias(model_name, "champion").version == first.version
    # Lower is better for a loss: 0.55 < 0.60 wins under that reading, on its own alias.
    assert promote_if_better(model_name, worse.version, "meta_val_accuracy", alias="lowest", higher_is_better=False) is True
    assert get_version_by_alias(model_name, "lowest").version == worse.version

    better = log_pruner(tiny_pruner(2), name=model_name, metrics={"meta_val_accuracy": 0.70})
    assert promote_if_better(model_name, better.version, "meta_val_accuracy") is True
    assert get_version_by_alias(model_name, "champion").version == better.version
    assert promote_if_better(model_name, better.version, "meta_val_accuracy") is False  # already champion
    assert list_versions(model_name) == [first.version, worse.version, better.version]

    with pytest.raises(RegistryError, match=r"no metric 'top5'.*meta_val_accuracy"):
        promote_if_better(model_name, better.version, "top5")
    # Put the original champion back for the other tests of this module.
    set_alias(model_name, "champion", first.version)
    assert get_version_by_alias(model_name, "champion").version == first.version


def test_missing_things_are_named_with_what_exists(champion: tuple[StampPruner, RegisteredPruner], model_name: str) -> None:
    with pytest.raises(RegistryError) as exc:
        load_pruner(f"models:/{model_name}@staging")
    assert "no alias 'staging'" in str(exc.value) and "champion -> version 1" in str(exc.value)

    with pytest.raises(RegistryError) as exc:
        load_pruner(f"models:/{model_name}/999")
    assert "no version '999'" in str(exc.value) and "versions: 1" in str(exc.value)

    with pytest.raises(RegistryError) as exc:
        load_pruner("models:/no-such-pruner@champion")
    assert "no registered model 'no-such-pruner'" in str(exc.value) and model_name in str(exc.value)

    with pytest.raises(RegistryError, match="no version '42'"):
        set_alias(model_name, "champion", 42)
    with pytest.raises(RegistryError, match="cannot parse model URI"):
        load_pruner("models:/just-a-name")
    with pytest.raises(RegistryError, match="not a directory"):
        load_pruner("/definitely/not/here")


def test_prune_dataset_from_the_registry(champion: tuple[StampPruner, RegisteredPruner], model_name: str, tmp_path: Path) -> None:
    """The downstream path: `stamp prune` with a models:/ URI."""
    from pipeline.apps.prune import load_pruned, prune_dataset

    report = prune_dataset(
        f"models:/{model_name}@champion", "procedural:shapes?n=8&test=2", 0.5, 0, tmp_path / "out",
        progress=False, export_onnx_model=False, export_torchscript_model=False,
    )
    assert report.pruner == f"models:/{model_name}@champion"
    assert report.macs_pruned / report.macs_full <= 0.5
    assert load_pruned(tmp_path / "out").num_classes == report.num_classes


def test_unreachable_tracking_server_fails_fast_and_clearly() -> None:
    (port,) = procs.free_ports(1)
    uri = f"http://someone:hunter2@127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as exc:
        load_pruner("models:/stamp-pruner@champion", tracking_uri=uri)
    assert time.monotonic() - t0 < 10
    message = str(exc.value)
    assert "cannot reach the MLflow tracking server" in message and f"127.0.0.1:{port}" in message
    assert "hunter2" not in message
    with pytest.raises(RegistryError, match="cannot reach"):
        log_pruner(tiny_pruner(0), tracking_uri=uri)
