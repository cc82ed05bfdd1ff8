"""`stamp prune --compare-full --register NAME --alias A`: the pruned network as its own served MLflow model.

One module-scoped run of the real command against the session's MLflow server (artifacts on
SeaweedFS) with a pruner fetched from that registry, then one real `mlflow models serve` of the
registered pruned network, queried over HTTP and compared with the local files of the run.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.apps.prune import load_pruned, resolve_data
from pipeline.registry import log_pruner, set_alias
from stamp_core import StampPruner, TrainConfig, default_finetune, prepare_images, prune_and_finetune, train_classifier
from tests._serving import invoke, served

pytestmark = pytest.mark.integration

DATA_SPEC = "procedural:stripes?n=16&test=6"
RATIO = 0.4
EPOCHS = 1


@pytest.fixture(scope="module")
def registered(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A pruner in the registry (alias champion), then the CLI run that prunes with it and registers the result."""
    ds = resolve_data(DATA_SPEC)
    torch.manual_seed(0)
    pruner = StampPruner.create(
        "small_cnn", num_classes=ds.num_classes, image_size=32, backbone_kwargs={"width": 8},
        embed_dim=32, hidden_dim=32, num_inducing=8,
    )
    train_classifier(pruner.backbone, prepare_images(ds.x_train, 32), torch.from_numpy(ds.y_train), TrainConfig(epochs=2, lr=0.02))
    pruner_name = f"stamp-pruner-src-{secrets.token_hex(4)}"
    set_alias(pruner_name, "champion", log_pruner(pruner, name=pruner_name).version)

    name = f"stamp-pruned-{secrets.token_hex(4)}"
    out = tmp_path_factory.mktemp("register") / "out"
    # The command as a user runs it: its own process, its terminal output captured.
    done = subprocess.run([
        sys.executable, "-m", "pipeline.apps.cli",
        "prune", "--model", f"models:/{pruner_name}@champion", "--data", DATA_SPEC, "--macs-ratio", str(RATIO),
        "--finetune-epochs", str(EPOCHS), "--out", str(out), "--compare-full", "--register", name, "--alias", "prod",
    ], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return {"name": name, "pruner_name": pruner_name, "out": out, "output": done.stdout + done.stderr, "dataset": ds,
            "report": json.loads((out / "report.json").read_text()), "pruner": pruner}


@pytest.fixture(scope="module")
def service(registered: dict[str, Any], mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served(f"models:/{registered['name']}@prod", mlflow_server, tmp_path_factory.mktemp("serve-pruned")) as server:
        yield server.invocations_url


def test_version_tags_and_description_match_the_report(registered: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version_by_alias(registered["name"], "prod")
    report, tags = registered["report"], mv.tags
    assert mv.version == "1"
    assert mv.description == (registered["out"] / "report.md").read_text()
    assert tags["lineage.pruner_uri"] == f"models:/{registered['pruner_name']}@champion"
    assert tags["lineage.pruner_version"] == "1" == report["pruner_version"]
    assert tags["lineage.dataset"] == report["dataset"] == registered["dataset"].name
    assert tags["lineage.dataset_sha256"] == report["dataset_sha256"] == registered["dataset"].content_sha256()
    assert float(tags["lineage.macs_ratio_target"]) == RATIO
    assert float(tags["metric.macs_ratio"]) == report["macs_ratio"] <= RATIO
    assert float(tags["metric.accuracy"]) == report["accuracy"]
    assert float(tags["metric.full_accuracy"]) == report["full_accuracy"]
    assert tags["stamp.kind"] == "pruned-network"
    assert f"registered models:/{registered['name']}/1" in registered["output"]
    # Quiet: MLflow's own log lines went to the log file the command named, not to the terminal.
    log = registered["out"] / "logs" / "prune.log"
    assert "Successfully registered model" in log.read_text()
    assert str(log) in " ".join(registered["output"].split())
    assert not re.search(r"\bINFO\b|Successfully registered|Downloading artifacts", registered["output"])
    # The report, its JSON and the kept-channels picture are run artifacts.
    listed = {f.path for f in client.list_artifacts(mv.run_id, "report")}
    assert listed == {"report/report.md", "report/report.json", "report/kept_channels.png"}
    png = Path(client.download_artifacts(mv.run_id, "report/kept_channels.png")).read_bytes()
    assert png == (registered["out"] / "kept_channels.png").read_bytes()


def test_compare_full_fine_tunes_the_full_net_with_the_same_settings(registered: dict[str, Any]) -> None:
    """The full network's figures are those of an independent run of the same path and settings."""
    ds, report = registered["dataset"], registered["report"]
    x_train, y_train = prepare_images(ds.x_train, 32), torch.from_numpy(ds.y_train)
    x_test, y_test = prepare_images(ds.x_test, 32), torch.from_numpy(ds.y_test)
    full = prune_and_finetune(registered["pruner"].backbone, None, x_train, y_train, x_test, y_test, default_finetune(EPOCHS, 0))
    assert report["full_accuracy"] == pytest.approx(full.accuracy, abs=1e-9)
    assert report["full_accuracy_before_finetune"] == pytest.approx(full.accuracy_before_finetune, abs=1e-9)
    # The same schedule, step for step: identical per-epoch training losses (seed, lr, data).
    assert [h["loss"] for h in report["full_history"]] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)
    assert len(report["full_history"]) == EPOCHS
    md = (registered["out"] / "report.md").read_text()
    assert f"| after fine-tune | {100 * report['accuracy']:.2f}% | {100 * report['full_accuracy']:.2f}% |" in md


def test_model_holds_state_dict_spec_and_onnx_and_nothing_pickled(registered: dict[str, Any], tmp_path: Path) -> None:
    import mlflow

    local = mlflow.artifacts.download_artifacts(f"models:/{registered['name']}@prod", dst_path=str(tmp_path))
    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    assert {"MLmodel", "pruned_pyfunc_model.py", "artifacts/pruned/spec.json", "artifacts/pruned/pruned_state_dict.pt",
            "artifacts/model.onnx"} <= files, files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    # The ONNX artifact is the verified export: it reproduces the local network.
    x = prepare_images(registered["dataset"].x_test[:5], 32)
    with torch.no_grad():
        ref = load_pruned(registered["out"])(x).numpy()
    got = ort.InferenceSession(str(Path(local) / "artifacts/model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4


def test_served_predictions_equal_the_local_model(registered: dict[str, Any], service: str) -> None:
    images = registered["dataset"].x_test  # uint8 NHWC, as the signature says
    status, body = invoke(service, images)
    assert status == 200, body
    scores = np.asarray(body["predictions"], dtype=np.float64)
    with torch.no_grad():
        local = load_pruned(registered["out"])(prepare_images(images, 32)).numpy()
    assert scores.shape == local.shape == (len(images), registered["dataset"].num_classes)
    assert np.abs(scores - local).max() < 1e-5
    # The scores are the network's: its accuracy is the report's.
    accuracy = float((scores.argmax(1) == registered["dataset"].y_test).mean())
    assert accuracy == pytest.approx(registered["report"]["accuracy"])


def test_served_model_refuses_bad_images_with_http_400(registered: dict[str, Any], service: str) -> None:
    h, w, c = registered["dataset"].image_shape
    status, body = invoke(service, np.zeros((2, h + 4, w, c), np.uint8))
    assert status == 400 and "does not match expected shape" in body["message"], body
    status, body = invoke(service, registered["dataset"].x_test[:2].astype(np.int64) + 256)
    assert status == 400 and "out of bounds for uint8" in body["message"], body
