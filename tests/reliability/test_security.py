"""Security: no loader unpickles untrusted bytes, secrets never surface, names cannot escape.

* A pickle payload whose ``__reduce__`` would create a marker file is fed through every path that
  loads weights or data; each refuses it with a typed error naming the file, and the marker is
  never created (nothing ran).
* A small real flow (ingest, catalog, prune, stack status, failing S3 calls, an MLflow-logged
  model) runs with known secrets in the environment; every output, log record, MLflow param, tag
  and artifact, and every file written is grepped for them.
* Dataset names, split names and shard URLs with ``..``, absolute paths, slashes or odd
  characters are refused at ingest and when a catalog is read, before anything is written or
  deleted.

(Loopback-only listeners and the refusal of anonymous S3 writes are tested on the real stack in
tests/pipeline/test_stack.py; test_faults.py checks loopback on its private SeaweedFS.)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import secrets
import shutil
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from _reliability_helpers import REPO_ROOT, MarkerPayload, grep_tree, raised_by_our_code, tiny_pruner
from typer.testing import CliRunner

from pipeline.apps.cli import app
from pipeline.apps.prune import load_pruned, prune_dataset
from pipeline.config import MetaTrainConfig
from pipeline.data import (
    ArrayDataset,
    Catalog,
    build_procedural,
    ingest_dataset,
    ingest_source,
    load_backbone_dir,
    load_npz,
    load_pretrained_backbone,
    remove_dataset,
    s3,
    save_backbone,
)
from pipeline.registry import PRUNER_ARTIFACT, RegistryError, StampPrunerModel, load_pruner, log_pruner
from pipeline.training import LocalContext, WorkerSetup, meta_train_worker
from stamp_core import StampPruner, prepare_images
from stamp_core.pruner import UnsafeWeightsError, WeightsFileError

pytestmark = pytest.mark.reliability

runner = CliRunner()


# ============================================================================ malicious pickles


@pytest.fixture(scope="module")
def clean_pruner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    pruner = StampPruner.create("small_cnn", num_classes=4, image_size=32, backbone_kwargs={"width": 8},
                                embed_dim=16, hidden_dim=16, num_inducing=4)
    return pruner.save(tmp_path_factory.mktemp("clean") / "pruner")


def _payload(marker: Path, fmt: str) -> bytes:
    """A weights file that runs ``Path.touch(marker)`` when unpickled without restrictions."""
    obj = {"backbone.stem.0.weight": MarkerPayload(marker)}
    if fmt == "torch-zip":
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    return pickle.dumps(obj, protocol=2)  # the legacy (non-zip) torch format is a bare pickle


def _check_payload_is_live(tmp: Path, fmt: str) -> None:
    """The same payload really executes under a permissive loader (else the test proves nothing)."""
    probe = tmp / "probe"
    data = _payload(probe, fmt)
    if fmt == "torch-zip":
        torch.load(io.BytesIO(data), weights_only=False)  # noqa: S614 - deliberately unsafe, on our own payload
    else:
        pickle.loads(data)  # noqa: S301 - same
    assert probe.exists()
    probe.unlink()


def _malicious_pruner_dir(clean: Path, dest: Path, data: bytes, file: str = "pruner_state_dict.pt") -> Path:
    shutil.copytree(clean, dest)
    (dest / file).write_bytes(data)
    return dest


def _load_meta_checkpoint(root: Path, catalog_url: str) -> None:
    cfg = MetaTrainConfig.model_validate(dict(
        backbone="small_cnn", backbone_kwargs={"width": 8}, steps=4, report_every=2, checkpoint_every=2,
        data={"catalog_url": catalog_url, "sources": ["blobs"]},
        episodes={"ways": [2, 3], "support_per_class": 3, "query_size": 8, "steps_per_epoch": 2},
        validation={"enabled": False}, pruner={"embed_dim": 16, "hidden_dim": 16, "num_inducing": 4},
        mlflow={"enabled": False},
    ))
    meta_train_worker(cfg, LocalContext(root), WorkerSetup(catalog_url=catalog_url))


LOADERS = [
    "StampPruner.load",
    "registry.load_pruner(dir)",
    "registry.load_pruner(MLflow model dir)",
    "pyfunc load_context",
    "prune.load_pruned",
    "train.load_backbone_dir",
    "train.load_pretrained_backbone(run dir)",
    "meta-train checkpoint: optimizer.pt",
    "meta-train checkpoint: pruner weights",
]


@pytest.mark.parametrize("fmt", ["torch-zip", "legacy-pickle"])
@pytest.mark.parametrize("loader", LOADERS)
def test_malicious_pickle_is_refused_by_every_loader(loader: str, fmt: str, clean_pruner_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    data = _payload(marker, fmt)
    _check_payload_is_live(tmp_path, fmt)
    target: Path
    if loader in ("StampPruner.load", "registry.load_pruner(dir)", "pyfunc load_context"):
        target = _malicious_pruner_dir(clean_pruner_dir, tmp_path / "pruner", data) / "pruner_state_dict.pt"
    with pytest.raises((UnsafeWeightsError, RegistryError, WeightsFileError)) as info:
        if loader == "StampPruner.load":
            StampPruner.load(target.parent)
        elif loader == "registry.load_pruner(dir)":
            load_pruner(str(target.parent))
        elif loader == "registry.load_pruner(MLflow model dir)":
            model = tmp_path / "model"
            target = _malicious_pruner_dir(clean_pruner_dir, model / "artifacts" / "pruner", data) / "pruner_state_dict.pt"
            (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
                "artifacts": {PRUNER_ARTIFACT: {"path": "artifacts/pruner"}}}}}))
            load_pruner(str(model))
        elif loader == "pyfunc load_context":
            import mlflow.pyfunc

            StampPrunerModel().load_context(mlflow.pyfunc.PythonModelContext({PRUNER_ARTIFACT: str(target.parent)}, None))
        elif loader == "prune.load_pruned":
            out = tmp_path / "out"
            out.mkdir()
            pruner = StampPruner.load(clean_pruner_dir)
            x = prepare_images(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), 32)
            spec = pruner.generate(x, macs_ratio=0.5)
            # The attacker controls both files, so the recorded sha256 matches the payload.
            spec.metadata["weights_sha256"] = hashlib.sha256(data).hexdigest()
            (out / "spec.json").write_text(spec.to_json())
            target = out / "pruned_state_dict.pt"
            target.write_bytes(data)
            load_pruned(out)
        elif loader in ("train.load_backbone_dir", "train.load_pretrained_backbone(run dir)"):
            d = tmp_path / "run" / "checkpoint_00000001"
            save_backbone(d, StampPruner.load(clean_pruner_dir).backbone, {"image_size": 32})
            target = d / "backbone_state_dict.pt"
            target.write_bytes(data)
            load_backbone_dir(d) if loader == "train.load_backbone_dir" else load_pretrained_backbone(str(d.parent))
        else:
            catalog_url = _tiny_catalog(tmp_path / "data")
            ckpt = tmp_path / "ckpts" / "checkpoint_00000002"
            shutil.copytree(clean_pruner_dir, ckpt)
            (ckpt / "state.json").write_text(json.dumps({"step": 2}))
            torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
            target = ckpt / ("optimizer.pt" if loader.endswith("optimizer.pt") else "pruner_state_dict.pt")
            target.write_bytes(data)
            _load_meta_checkpoint(tmp_path / "ckpts", catalog_url)
    exc = info.value
    message = str(exc)
    assert f"refused to load {target}" in message, message
    assert "not a plain state_dict of tensors" in message and "Nothing in it was executed" in message
    assert "weights_only=False" not in message  # never advise the unsafe retry
    assert raised_by_our_code(exc)
    assert not marker.exists(), "the payload ran"


def _tiny_catalog(root: Path) -> str:
    ingest_dataset(build_procedural("blobs", n_per_class=12, seed=0, n_test_per_class=2), str(root),
                   shard_size=100, progress=False)
    return str(root / "catalog.json")


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npz"
    x = np.zeros((2, 6, 6, 1), np.uint8)
    np.savez(path, x_train=np.array([MarkerPayload(marker), None], dtype=object), y_train=np.array([0, 1]),
             x_test=x, y_test=np.array([0, 1]))
    np.load(path, allow_pickle=True)["x_train"]  # live: a permissive loader runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot read as .npz without pickles")):
        load_npz(path)
    assert not marker.exists()


def test_no_code_path_can_unpickle() -> None:
    """Every torch.load passes weights_only=True; nothing calls pickle/np.load with pickles allowed."""
    offenders = []
    for path in sorted([*(REPO_ROOT / "stamp_core").rglob("*.py"), *(REPO_ROOT / "pipeline").rglob("*.py"),
                        *(REPO_ROOT / "jobs").rglob("*.py")]):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path}: {match.group(0)[:80]}")
        for pattern in (r"\bpickle\.loads?\(", r"\bcloudpickle\b", r"\bdill\b", r"allow_pickle\s*=\s*True",
                        r"weights_only\s*=\s*False", r"\bjoblib\.load\("):
            offenders += [f"{path}: {m.group(0)}" for m in re.finditer(pattern, text)]
        for match in re.finditer(r"np\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "allow_pickle=False" not in match.group(0):
                offenders.append(f"{path}: {match.group(0)[:80]}")
    assert offenders == []


# ============================================================================ secrets


@pytest.mark.integration
def test_secrets_never_surface_in_outputs_logs_mlflow_or_files(
    seaweedfs: Any, s3_bucket: str, mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    import os

    from mlflow import MlflowClient

    s3_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    mlflow_password = f"mlflow-pw-{secrets.token_hex(12)}"
    # MLflow clients send these as basic auth; the test server ignores them, a real one checks them.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "stamp-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_password)
    needles = [s3_secret, mlflow_password]
    caplog.set_level(logging.DEBUG)
    outputs: list[str] = []
    errors: list[str] = []

    def cli(*args: str, ok: bool = True) -> None:
        result = runner.invoke(app, list(args))
        outputs.append(result.output)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            errors.append("".join(traceback.format_exception(result.exception)))
        assert (result.exit_code == 0) == ok, result.output

    def failing(fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every failure's full text is collected
            errors.append("".join(traceback.format_exception(exc)))
        else:
            raise AssertionError("expected a failure")

    dest = f"s3://{s3_bucket}/datasets"
    # Data plane through the CLI: ingest, list, status; then failures that involve credentials.
    cli("ingest", "procedural:stripes?n=6&test=2", "--dest", dest)
    cli("datasets", "list", "--catalog", f"{dest}/catalog.json")
    cli("stack", "status")
    cli("ingest", "procedural:blobs?n=2", "--dest", f"s3://no-such-bucket-{secrets.token_hex(3)}/d", ok=False)
    with monkeypatch.context() as m:
        m.setenv("AWS_SECRET_ACCESS_KEY", s3_secret[::-1])  # wrong secret: the server refuses it
        needles.append(s3_secret[::-1])
        failing(lambda: s3.get_bytes(f"{dest}/catalog.json"))
    with monkeypatch.context() as m:
        m.setenv("AWS_MAX_ATTEMPTS", "1")
        failing(lambda: s3.get_bytes(f"{dest}/catalog.json", endpoint_url="http://127.0.0.1:9"))
    failing(lambda: load_pruner("models:/no-such-model@champion", tracking_uri=mlflow_server))
    failing(lambda: load_pruner("models:/x@champion", tracking_uri=f"http://stamp-user:{mlflow_password}@127.0.0.1:9"))

    # Downstream prune from the catalogued shards; its written files are grepped below.
    pruner = tiny_pruner()
    out = tmp_path / "pruned"
    prune_dataset(pruner, f"{dest}/stripes", 0.5, 0, out, progress=False, export_onnx_model=False)

    # MLflow: secret-looking config keys and URLs with credentials go through the logging path.
    config = {"aws_secret_access_key": s3_secret, "storage": f"s3://{s3_bucket}/ray",
              "tracking": f"http://stamp-user:{mlflow_password}@mlflow.internal:5000"}
    name = f"secret-grep-{secrets.token_hex(3)}"
    registered = log_pruner(
        pruner, name=name, experiment="secret-grep", tracking_uri=mlflow_server,
        params={"api_token": mlflow_password, "endpoint": f"http://stamp-user:{mlflow_password}@h:1"},
        tags={"source": f"https://stamp-user:{mlflow_password}@git.internal/repo"},
        lineage={"config": config, "catalog_url": f"{dest}/catalog.json"},
    )
    client = MlflowClient(mlflow_server)
    run = client.get_run(registered.run_id)
    logged = [*run.data.params.items(), *run.data.tags.items(),
              *client.get_model_version(name, registered.version).tags.items()]
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(registered.run_id, "", str(artifacts))
    # The registered model is models-from-code: JSON + state_dict, no pickled Python object.
    model_dir = Path(__import__("mlflow").artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path / "model")))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"artifacts/pruner/pruner.json", "artifacts/pruner/pruner_state_dict.pt"} <= files, files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".joblib"))], files
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert "python_model" not in mlmodel["flavors"]["python_function"], "a pickled python_model was logged"

    captured = capfd.readouterr()
    texts = {
        "CLI output": "\n".join(outputs),
        "errors and tracebacks": "\n".join(errors),
        "log records": "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records),
        "stdout/stderr": captured.out + captured.err,
        "MLflow params and tags": json.dumps(logged),
    }
    leaks = [f"{where}: {n[:4]}..." for where, text in texts.items() for n in needles if n in text]
    leaks += grep_tree(tmp_path, needles)  # written configs/json, prune outputs, downloaded artifacts
    leaks += grep_tree(Path(os.environ["STAMP_HOME"]), needles)
    leaks += grep_tree(seaweedfs.log_path.parent, [mlflow_password])  # the S3 server's own log and data dir
    assert leaks == [], leaks
    # The flow did run: each channel actually carried text to grep.
    assert len(errors) == 4 and all(errors) and caplog.records and "stripes" in texts["CLI output"]
    assert run.data.params["api_token"] == "***" and run.data.params["endpoint"] == "http://***@h:1"
    assert json.loads((artifacts / "lineage" / "config.json").read_text())["aws_secret_access_key"] == "***"


# ============================================================================ names and keys


BAD_NAMES = ["..", "../x", "a/../b", "/etc", "a/b", "a\\b", " x", "x y", ".hidden", "-x", "x\n", "x\x00", "é", "", "x" * 129, "a..b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_dataset_names_are_refused_at_ingest_before_writing(bad: str, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    ds = build_procedural("blobs", n_per_class=2, seed=0)
    with pytest.raises(ValueError) as info:
        ingest_dataset(ArrayDataset(bad, ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.class_names), str(dest),
                       progress=False)
    assert repr(bad) in str(info.value) or "empty" in str(info.value)
    assert "dataset name" in str(info.value)
    if bad:  # an empty --name means "the default name"
        with pytest.raises(ValueError, match="dataset name"):
            ingest_source("procedural:blobs?n=2", str(dest), name=bad, progress=False)
    assert not dest.exists()  # nothing written anywhere


def test_bad_split_names_and_cli_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"split name '\.\./train' contains a slash"):
        from pipeline.data import shard_name

        shard_name("../train", 0)
    result = runner.invoke(app, ["datasets", "remove", "../../etc", "--catalog", str(tmp_path / "catalog.json")])
    assert result.exit_code == 2
    assert "dataset name '../../etc' contains a slash" in " ".join(result.output.split())
    result = runner.invoke(app, ["ingest", "procedural:blobs?n=2", "--name", "a/b", "--dest", str(tmp_path / "d")])
    assert result.exit_code == 2 and "contains a slash" in " ".join(result.output.split())
    assert not (tmp_path / "d").exists()


def _catalog_doc(url: str, name: str = "victim", split: str = "train") -> str:
    return json.dumps({"schema_version": 1, "datasets": {name: {
        "name": name, "num_classes": 1, "class_names": ["a"], "image_shape": [8, 8, 1],
        "created_at": "2024-01-01T00:00:00+00:00", "source": "x",
        "splits": {split: {"samples": 1, "shards": [{"url": url, "sha256": "a" * 64, "samples": 1}]}}}}})


@pytest.mark.parametrize(("url", "name", "split", "message"), [
    ("{root}/../outside/victim/train-000000.tar", "victim", "train", "'.', '..' or empty path segments"),
    ("/etc/passwd", "victim", "train", "is not inside the dataset's directory"),
    ("{root}/keep.txt", "victim", "train", "is not inside the dataset's directory"),
    ("{root}/other/train-000000.tar", "victim", "train", "is not inside the dataset's directory"),
    ("s3://other-bucket/victim/test-000000.tar", "victim", "train", "is not inside the dataset's directory"),
    ("http://evil.example/victim/train-000000.tar", "victim", "train", "has scheme 'http'"),
    ("{root}/victim/train-000000.tar", "../victim", "train", "contains a slash"),
    ("{root}/victim/../train-000000.tar", "victim", "train", "'.', '..' or empty path segments"),
    ("{root}/victim/x/train-000000.tar", "victim", "x/train", "split name 'x/train' contains a slash"),
])
def test_catalog_entries_that_escape_their_prefix_are_refused_before_any_delete(
    url: str, name: str, split: str, message: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    victim = root / "keep.txt"
    victim.write_text("someone else's data")
    catalog_url = str(root / "catalog.json")
    (root / "catalog.json").write_text(_catalog_doc(url.format(root=root), name, split))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        Catalog.load(catalog_url)
    assert f"catalog {catalog_url}" in str(info.value)
    with pytest.raises(ValueError):
        remove_dataset(name if "/" not in name else "victim", catalog_url)
    result = runner.invoke(app, ["datasets", "list", "--catalog", catalog_url])
    assert result.exit_code == 2 and "error: ValueError" in result.output
    assert victim.read_text() == "someone else's data"
