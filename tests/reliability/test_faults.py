"""Injected faults: S3 killed mid-ingest and mid-stream, MLflow down at the start and lost during
training, a full disk and a read-only directory under `stamp prune`.

Every case checks the three promises of the issue: the failure is a typed error that names what
broke, retrying after the fault is gone completes the job, and no data is lost or left half-written.
(A killed Ray worker and resume-by-name are covered in tests/pipeline/test_train.py.)
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
from _reliability_helpers import free_port, kill_service, private_seaweedfs, tiny_pruner
from typer.testing import CliRunner

from pipeline.apps.cli import app
from pipeline.apps.prune import OutputDirError, load_pruned, prune_dataset
from pipeline.config import MetaTrainConfig, PretrainConfig, TuneConfig
from pipeline.data import ArrayDataset, Catalog, build_procedural, ingest_dataset, entry_url, iter_samples, load_split_arrays, s3
from pipeline.registry import RegistryError, load_pruner
from pipeline.stack import MlflowServer, procs
from stamp_core import StampPruner, prepare_images

pytestmark = pytest.mark.reliability

runner = CliRunner()
DATA_SPEC = "procedural:stripes?n=12&test=4"


# ============================================================================ S3 killed


class _SendCounter:
    """Counts HTTP attempts a boto3 client makes (retries included) through botocore's events."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.times: list[float] = []
        client.meta.events.register("before-send.s3", self._on_send)

    def _on_send(self, **_: Any) -> None:
        self.times.append(time.monotonic())

    def close(self) -> None:
        self.client.meta.events.unregister("before-send.s3", self._on_send)


def _assert_storage_consistent(dest: str, catalog_url: str) -> Catalog:
    """Every catalogued shard exists with its sha256; nothing else (partial, stale) is under dest:
    the index, one entry object per catalogued dataset, their shards."""
    catalog = Catalog.load(catalog_url, missing_ok=False)
    listed: set[str] = {catalog_url}
    for name in catalog.names():
        listed.add(entry_url(catalog_url, name))
        for split in catalog.get(name).splits.values():
            for shard in split.shards:
                data = s3.get_bytes(shard.url)
                assert hashlib.sha256(data).hexdigest() == shard.sha256, shard.url
                listed.add(shard.url)
    assert set(s3.list_urls(dest)) == listed
    return catalog


def _assert_round_trip(ds: ArrayDataset, catalog_url: str) -> None:
    for split, (x, y) in ds.splits.items():
        got_x, got_y = load_split_arrays(catalog_url, ds.name, split, verify_sha256=True)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)


@pytest.mark.integration
def test_s3_killed_mid_ingest_retries_then_fails_clearly_and_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with private_seaweedfs(tmp_path / "weed", monkeypatch, max_attempts=3) as private:
        # The private server listens on loopback only, like every service of the stack.
        assert private.server.record is not None
        for proc in procs.owned_processes(private.server.record):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert conn.laddr.ip == "127.0.0.1", conn
        private.server.client().create_bucket(Bucket="ingest-kill")
        dest = "s3://ingest-kill/datasets"
        catalog_url = f"{dest}/catalog.json"
        ingest_dataset(build_procedural("blobs", n_per_class=5, seed=0), dest, shard_size=50, progress=False)
        ds = build_procedural("textures", n_per_class=10, seed=0)  # 80 train -> 4 shards of 20, 1 test shard
        counter = _SendCounter(s3.make_s3_client())
        killed_at: list[int] = []

        def kill_after_two(shard: Any, uploaded: bool) -> None:
            if len(killed_at) == 0 and shard.url.endswith("train-000001.tar"):
                killed_at.append(len(counter.times))
                private.kill()

        t0 = time.monotonic()
        try:
            with pytest.raises(s3.StorageError) as info:
                ingest_dataset(ds, dest, shard_size=20, progress=False, on_shard=kill_after_two)
        finally:
            counter.close()
        elapsed = time.monotonic() - t0
        message = str(info.value)
        assert message.startswith(f"cannot read {dest}/textures/train-000002.tar: the S3 endpoint {private.endpoint} is unreachable")
        assert "stamp stack status" in message
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
        attempts = counter.times[killed_at[0]:]
        assert len(attempts) == 3  # AWS_MAX_ATTEMPTS: the first try and two retries, then the error
        assert elapsed < 30
        # While the server is down nothing can be read, and nothing claims to be there.
        private.restart()
        assert Catalog.load(catalog_url).names() == ["blobs"]  # no entry points at the half-written dataset
        uploads: list[bool] = []
        entry = ingest_dataset(ds, dest, shard_size=20, progress=False, on_shard=lambda s, up: uploads.append(up))
        assert uploads == [False, False, True, True, True]  # the two finished shards are reused, not duplicated
        catalog = _assert_storage_consistent(dest, catalog_url)
        assert catalog.names() == ["blobs", "textures"] and catalog.get("textures") == entry
        _assert_round_trip(ds, catalog_url)


@pytest.mark.integration
def test_s3_killed_mid_stream_fails_clearly_and_reread_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with private_seaweedfs(tmp_path / "weed", monkeypatch, max_attempts=2) as private:
        private.server.client().create_bucket(Bucket="stream-kill")
        dest = "s3://stream-kill/datasets"
        catalog_url = f"{dest}/catalog.json"
        ds = build_procedural("blobs", n_per_class=10, seed=3)  # 80 train -> 4 shards of 20
        ingest_dataset(ds, dest, shard_size=20, progress=False)
        stream = iter_samples(catalog_url, "blobs", "train")
        it = iter(stream)
        got = [next(it) for _ in range(25)]  # the second shard is open and buffered
        private.kill()
        with pytest.raises(s3.StorageError) as info:
            for sample in it:
                got.append(sample)
        message = str(info.value)
        assert f"the S3 endpoint {private.endpoint} is unreachable" in message
        assert re.search(r"blobs/train-00000[23]\.tar", message), message
        # Not a data problem: nothing was skipped as corrupt, and what was delivered is exact.
        assert stream.stats["skipped_corrupt_shard"] == 0 and stream.bad_count == 0
        for sample in got:
            index = int(sample.key.split("/")[1])
            np.testing.assert_array_equal(sample.image, ds.x_train[index])
            assert sample.label == ds.y_train[index]
        private.restart()
        _assert_storage_consistent(dest, catalog_url)
        again = iter_samples(catalog_url, "blobs", "train")
        keys = [int(s.key.split("/")[1]) for s in again]
        assert keys == list(range(80)) and again.bad_count == 0


# ============================================================================ MLflow down at start


def _ingest_local(root: Path) -> str:
    for name in ("blobs", "stripes"):
        ingest_dataset(build_procedural(name, n_per_class=40, seed=0, n_test_per_class=12), str(root),
                       shard_size=100, progress=False)
    return str(root / "catalog.json")


@pytest.fixture(scope="module")
def local_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _ingest_local(tmp_path_factory.mktemp("reliability-data"))


def _meta_cfg(catalog_url: str, storage: Path, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = dict(
        kind="meta_train",
        backbone="small_cnn",
        backbone_kwargs={"width": 8},
        run_name="mlflow-fault",
        storage_path=str(storage),
        steps=6,
        report_every=2,
        checkpoint_every=2,
        data={"catalog_url": catalog_url, "sources": "all"},
        episodes={"ways": [2, 4], "support_per_class": 5, "query_size": 16, "steps_per_epoch": 3},
        validation={"enabled": False},
        pruner={"embed_dim": 32, "hidden_dim": 32, "num_inducing": 8},
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        mlflow={"enabled": True, "experiment": "reliability"},
    )
    data.update(overrides)
    return data


@pytest.mark.parametrize("job", ["meta_train", "pretrain", "tune", "cli", "ray-job-script"])
def test_mlflow_down_at_start_fails_before_any_compute(
    job: str, local_catalog: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    storage = tmp_path / "ray"
    meta = _meta_cfg(local_catalog, storage)
    expected = f"cannot reach the MLflow tracking server at {dead}"
    t0 = time.monotonic()
    if job == "cli":
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(meta))
        result = runner.invoke(app, ["meta-train", "--config", str(path)])
        assert result.exit_code == 2, result.output
        assert expected in " ".join(result.output.split())
    elif job == "ray-job-script":  # what `ray job submit -- python jobs/meta_train.py` runs
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(meta))
        root = Path(__file__).resolve().parents[2]
        proc = subprocess.run([sys.executable, str(root / "jobs" / "meta_train.py"), "--config", str(path)],
                              capture_output=True, text=True, timeout=120, cwd=root)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"error: RegistryError: {expected}" in proc.stderr
        assert "Started a local Ray instance" not in proc.stderr  # it failed before Ray was started
    else:
        from pipeline import training

        with pytest.raises(RegistryError, match=re.escape(expected)):
            if job == "meta_train":
                training.run_meta_train(MetaTrainConfig.model_validate(meta))
            elif job == "pretrain":
                training.run_pretrain(PretrainConfig.model_validate(dict(
                    kind="pretrain", backbone="small_cnn", backbone_kwargs={"width": 8}, run_name="pre-fault",
                    storage_path=str(storage), epochs=1, data={"catalog_url": local_catalog, "sources": "all"},
                    mlflow={"enabled": True},
                )))
            else:
                training.run_tune(TuneConfig.model_validate(dict(
                    kind="tune", name="tune-fault", storage_path=str(storage), num_samples=1, register=True,
                    scheduler={"grace_period": 2},
                    meta_train={**{k: v for k, v in meta.items() if k != "kind"}, "validation": {"enabled": True}},
                )))
    # One short probe, not MLflow's minutes of retries (a fresh interpreter also pays its imports).
    assert time.monotonic() - t0 < (60 if job == "ray-job-script" else 15)
    assert not storage.exists()  # no Ray run, no checkpoint directory: nothing was spent


# ============================================================================ MLflow lost during training


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_lost_during_meta_training_keeps_the_pruner_and_register_from_checkpoint_later(
    ray_local: None, seaweedfs: Any, mlflow_server: str, local_catalog: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    seaweedfs.ensure_bucket("mlflow-artifacts")
    private = MlflowServer(
        backend_store_uri=f"sqlite:///{tmp_path / 'private-mlflow.db'}",
        artifacts_destination="s3://mlflow-artifacts/private",
        port=free_port(),
        s3_endpoint=seaweedfs.endpoint_url,
        credentials=seaweedfs.credentials,
        log_path=tmp_path / "private-mlflow.log",
        workers=1,
    )
    private.start(timeout=120)
    storage = tmp_path / "ray"
    run_dir = storage / "mlflow-fault"
    killed = threading.Event()

    def kill_at_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed.is_set():
            if (run_dir / "checkpoint_00000002" / "state.json").exists():
                kill_service(private)
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_at_first_checkpoint, daemon=True)
    try:
        from pipeline.training import run_meta_train

        # Validation on: the end of the run also validates and logs plots, with MLflow gone.
        cfg = MetaTrainConfig.model_validate(_meta_cfg(local_catalog, storage, mlflow={
            "enabled": True, "experiment": "reliability", "tracking_uri": private.tracking_uri},
            validation={"enabled": True, "every": 0, "tasks": 1, "ways": 2, "shots": 3, "test_per_class": 3,
                        "finetune_epochs": 0}))
        watcher.start()
        caplog.set_level(logging.WARNING, logger="pipeline.training")
        t0 = time.monotonic()
        result = run_meta_train(cfg)
        elapsed = time.monotonic() - t0
    finally:
        killed.set()
        watcher.join(timeout=10)
        private.stop()
    assert private.record is None
    # Training finished despite the outage, without MLflow's minutes of retries per report.
    assert result.step == 6 and elapsed < 120
    final = run_dir / "checkpoint_00000006"
    assert (final / "pruner.json").is_file() and (final / "pruner_state_dict.pt").is_file()
    warning = " ".join(r.getMessage() for r in caplog.records if "could not close MLflow run" in r.getMessage())
    assert f"The checkpoints are kept in {run_dir}" in warning
    assert f"stamp register --from-checkpoint {run_dir}" in warning

    # A tune job that ends while MLflow is down says the same: where the pruner is, how to register it.
    from pipeline.training import register_best

    tune_cfg = TuneConfig.model_validate(dict(kind="tune", name="t", register=True, scheduler={"grace_period": 2}, meta_train={
        **_meta_cfg(local_catalog, storage, mlflow={"tracking_uri": private.tracking_uri}),
        "validation": {"enabled": True}, "kind": "meta_train"}))
    with pytest.raises(RegistryError) as info:
        register_best(result.pruner_dir, {"val_accuracy": 0.5}, tune_cfg, checkpoint_path=str(run_dir))
    message = str(info.value)
    assert f"cannot reach the MLflow tracking server at {private.tracking_uri}" in message
    assert f"NOT registered; it is kept in {run_dir}" in message
    assert f"stamp register --from-checkpoint {run_dir} --name stamp-pruner" in message

    # Later, with MLflow back (here: the session's server), the command registers that pruner.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = f"rel-from-ckpt-{os.getpid()}"
    out = runner.invoke(app, ["register", "--from-checkpoint", str(run_dir), "--name", model, "--alias", "champion"])
    assert out.exit_code == 0, out.output
    assert f"registered models:/{model}/1" in out.output and "alias 'champion' -> version 1" in out.output
    by_name = runner.invoke(app, ["register", "--from-checkpoint", "mlflow-fault", "--storage-path", str(storage),
                                  "--name", model])
    assert by_name.exit_code == 0 and f"models:/{model}/2" in by_name.output, by_name.output
    original = StampPruner.load(final)
    assert original.config.metadata["step"] == 6
    x = prepare_images(build_procedural("glyphs", n_per_class=6, seed=5).x_train, 32)
    labels = np.repeat(np.arange(len(x) // 6), 6)[: len(x)]
    for uri in (f"models:/{model}@champion", f"models:/{model}/2"):
        registered = load_pruner(uri)
        assert registered.generate(x, labels, macs_ratio=0.4).to_dict() == original.generate(x, labels, macs_ratio=0.4).to_dict()
    from mlflow import MlflowClient

    tags = MlflowClient(mlflow_server).get_model_version(model, "1").tags
    assert tags["lineage.checkpoint"] == str(final)
    assert tags["lineage.checkpoint_step"] == "6" and tags["lineage.run_name"] == "mlflow-fault"
    # Bad sources are named, with what is expected instead.
    missing = runner.invoke(app, ["register", "--from-checkpoint", "no-such-run", "--storage-path", str(storage)])
    assert missing.exit_code == 2
    assert "no checkpoint of run 'no-such-run'" in " ".join(missing.output.split())


# ============================================================================ prune: full disk, read-only


@pytest.fixture(scope="module")
def pruner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pruner().save(tmp_path_factory.mktemp("rel-pruner") / "pruner")


@pytest.fixture(scope="module")
def _pruned_once(pruner_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel-pruned") / "out"
    prune_dataset(pruner_dir, DATA_SPEC, 0.5, 0, out, progress=False, export_onnx_model=False)
    return out


@pytest.fixture()
def previous_output(_pruned_once: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A valid `stamp prune` output directory (a fresh copy per test) and its exact bytes."""
    out = tmp_path / "out"
    shutil.copytree(_pruned_once, out)
    return out, {p.name: p.read_bytes() for p in sorted(out.iterdir())}


class _PartialWriter(io.FileIO):
    """A file whose writes stop half-way with ENOSPC, as on a disk that fills up."""

    def write(self, data: Any) -> int:
        half = memoryview(data)[: max(1, len(data) // 2)]
        super().write(half)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_leaves_the_previous_output_untouched(
    where: str, pruner_dir: Path, previous_output: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.apps.prune as prune_mod

    out, before = previous_output
    if where == "write":
        # prune's own `open` (module global, shadows the builtin) hands out half-writing files.
        monkeypatch.setattr(prune_mod, "open", lambda path, mode="r": _PartialWriter(path, mode.replace("b", "")), raising=False)
    else:

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputDirError) as info:
        prune_dataset(pruner_dir, DATA_SPEC, 0.3, 0, out, progress=False, export_onnx_model=False,
                      export_torchscript_model=False)
    monkeypatch.undo()
    assert str(info.value) == (
        f"writing pruned_state_dict.pt to {out} failed: the disk (or quota) is full "
        f"(No space left on device); nothing was written"
    )
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before  # byte for byte, no leftovers
    model = load_pruned(out)  # the old spec still describes the old weights
    assert model.classifier.out_features == 8


def test_read_only_output_dir_keeps_the_previous_output(
    pruner_dir: Path, previous_output: tuple[Path, dict[str, bytes]], unprivileged_prefix: list[str]
) -> None:
    out, before = previous_output
    prefix = unprivileged_prefix
    code = (
        "import sys\n"
        "from pipeline.apps.prune import OutputDirError, prune_dataset\n"
        "try:\n"
        f"    prune_dataset({str(pruner_dir)!r}, {DATA_SPEC!r}, 0.3, 0, {str(out)!r}, progress=False,"
        " export_onnx_model=False, export_torchscript_model=False)\n"
        "except OutputDirError as exc:\n"
        "    print('OUTPUT_DIR_ERROR', exc)\n"
        "    sys.exit(3)\n"
    )
    out.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                              capture_output=True, text=True, timeout=180)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"OUTPUT_DIR_ERROR output directory {out} is not writable (Permission denied)" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before
    load_pruned(out)
