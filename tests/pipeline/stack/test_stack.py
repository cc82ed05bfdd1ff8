"""The embedded stack for real: SeaweedFS + MLflow (+ a Ray head, slow) on free ports in a tmp STAMP_HOME."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pipeline.settings import get_settings, load_stack_credentials, read_credentials
from pipeline.stack import (
    MlflowServer,
    S3Credentials,
    SeaweedFS,
    SeaweedPorts,
    StackConfig,
    StackError,
    StackInfo,
    procs,
    stack_down,
    stack_status,
    stack_up,
)

pytestmark = pytest.mark.integration


def _free_config(state_dir: Path, **overrides: object) -> StackConfig:
    mlflow_port, ray_port, dashboard_port = procs.free_ports(3)
    values: dict[str, object] = {
        "state_dir": state_dir,
        "s3_port": procs.free_port_block(SeaweedPorts.offsets()),
        "mlflow_port": mlflow_port,
        "ray_port": ray_port,
        "ray_dashboard_port": dashboard_port,
        "mlflow_workers": 1,
        "timeout_s": 120.0,
    }
    values.update(overrides)
    return StackConfig(**values)  # type: ignore[arg-type]


def _stack_processes(state_dir: Path) -> dict[str, list[psutil.Process]]:
    """Every live process in the recorded groups, marker or not: what `down` must leave dead."""
    out: dict[str, list[psutil.Process]] = {}
    for pid_file in (state_dir / "pids").glob("*.json"):
        record = procs.read_record(pid_file)
        assert record is not None
        members = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == record.pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc)
            except (ProcessLookupError, psutil.Error):
                pass
        out[record.service] = members
    return out


def _clear_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    names = (
        "STAMP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "STAMP_BUCKET",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL",
    )  # fmt: skip
    for name in names:
        monkeypatch.setenv(name, "x")  # records the original so it is restored
        monkeypatch.delenv(name)


@dataclass
class Stack:
    config: StackConfig
    info: StackInfo

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def s3(self) -> SeaweedFS:
        stored = read_credentials(self.state_dir)
        assert stored is not None
        return SeaweedFS(
            self.state_dir / "s3",
            self.state_dir / "logs" / "s3.log",
            SeaweedPorts.from_s3_port(self.config.s3_port),
            S3Credentials(*stored),
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = _free_config(tmp_path_factory.mktemp("stamp-home"))
    try:
        info = stack_up(config)
        yield Stack(config, info)
    finally:
        stack_down(config.state_dir)


def test_up_starts_healthy_services(stack: Stack) -> None:
    info = stack.info
    assert set(info.services) == {"s3", "mlflow"}
    assert all(s.state == "started" for s in info.services.values())
    status = stack_status(stack.state_dir)
    for name in ("s3", "mlflow"):
        svc = status.services[name]
        assert svc.running and svc.healthy, status.summary()
        assert svc.pid == info.services[name].pid
    assert status.services["mlflow"].endpoint == f"http://127.0.0.1:{stack.config.mlflow_port}"
    with urllib.request.urlopen(f"{status.services['mlflow'].endpoint}/health", timeout=5) as resp:
        assert resp.read().strip() == b"OK"

    creds = stack.state_dir / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    stack_json = json.loads((stack.state_dir / "stack.json").read_text())
    assert stack_json["services"]["s3"]["endpoint"] == f"http://127.0.0.1:{stack.config.s3_port}"
    assert stack_json["services"]["s3"]["running"] is True


def test_every_service_port_is_loopback_only(stack: Stack) -> None:
    groups = _stack_processes(stack.state_dir)
    pids = {p.pid for members in groups.values() for p in members}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening
    for conn in listening:
        assert conn.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1"), conn


def test_s3_refuses_anonymous_and_accepts_credentials(stack: Stack) -> None:
    endpoint = stack.info.services["s3"].endpoint
    anonymous = urllib.request.Request(f"{endpoint}/stamp/anonymous.txt", data=b"nope", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(anonymous, timeout=5)
    assert excinfo.value.code == 403

    client = stack.s3().client()
    client.put_object(Bucket="stamp", Key="hello.txt", Body=b"hi")
    assert client.get_object(Bucket="stamp", Key="hello.txt")["Body"].read() == b"hi"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="stamp").get("Contents", [])]
    assert "anonymous.txt" not in keys


def test_settings_point_at_running_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_client_env(monkeypatch)
    monkeypatch.setenv("STAMP_HOME", str(stack.state_dir))
    settings = get_settings()
    assert settings.s3_endpoint == stack.info.services["s3"].endpoint
    assert settings.mlflow_uri == stack.info.services["mlflow"].endpoint
    assert settings.bucket == "stamp"
    load_stack_credentials(stack.state_dir)

    import boto3

    # A client from the standard env only. A fresh session, because boto3's default session
    # would cache these credentials for every later test.
    client = boto3.session.Session().client("s3")
    client.put_object(Bucket=settings.bucket, Key="from-env.txt", Body=b"env")
    assert client.get_object(Bucket=settings.bucket, Key="from-env.txt")["Body"].read() == b"env"


def test_mlflow_artifact_lands_in_seaweedfs(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    # The client needs no S3 keys: the server proxies artifacts.
    _clear_client_env(monkeypatch)
    client = MlflowClient(tracking_uri=stack.info.services["mlflow"].endpoint)
    experiment_id = client.create_experiment("stack-test")
    run = client.create_run(experiment_id)
    client.log_text(run.info.run_id, "artifact body", "notes/hello.txt")
    client.set_terminated(run.info.run_id)

    s3 = stack.s3().client()
    objects = s3.list_objects_v2(Bucket="stamp", Prefix="mlflow/").get("Contents", [])
    keys = [o["Key"] for o in objects if o["Key"].endswith("notes/hello.txt")]
    assert len(keys) == 1 and run.info.run_id in keys[0]
    assert s3.get_object(Bucket="stamp", Key=keys[0])["Body"].read() == b"artifact body"


def test_second_up_is_idempotent(stack: Stack) -> None:
    again = stack_up(stack.config)
    assert {n: s.state for n, s in again.services.items()} == {"s3": "already running", "mlflow": "already running"}
    assert {n: s.pid for n, s in again.services.items()} == {n: s.pid for n, s in stack.info.services.items()}


def test_port_taken_by_someone_else_names_port(stack: Stack, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = _free_config(tmp_path / "home", mlflow_port=port)
        with pytest.raises(StackError) as excinfo:
            stack_up(config)
    message = str(excinfo.value)
    assert f"port {port}" in message and "MLflow" in message and "STAMP_MLFLOW_PORT" in message
    # Checked up front: nothing was started for the clash.
    assert not list((tmp_path / "home" / "pids").glob("*.json"))
    assert isinstance(excinfo.value, RuntimeError)

    # The stack's own running SeaweedFS holds its port too: a second stack elsewhere is refused.
    with pytest.raises(StackError, match=f"port {stack.config.s3_port} "):
        stack_up(_free_config(tmp_path / "other", s3_port=stack.config.s3_port))


def test_service_that_dies_on_start_reports_its_log_without_secrets(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    (port,) = procs.free_ports(1)
    server = MlflowServer(
        backend_store_uri="bogus-scheme://nowhere",
        artifacts_destination="s3://none/mlflow",
        port=port,
        s3_endpoint=seaweedfs.endpoint_url,
        credentials=seaweedfs.credentials,
        log_path=tmp_path / "mlflow.log",
        workers=1,
    )
    with pytest.raises(StackError) as excinfo:
        server.start(timeout=120)
    message = str(excinfo.value)
    assert "MLflow server" in message and "exited with code" in message
    assert str(tmp_path / "mlflow.log") in message and "bogus-scheme" in message  # the log's tail
    assert seaweedfs.credentials.secret_access_key not in message
    assert server.record is None and not procs.port_in_use(port)


def test_no_secret_in_status_stack_json_or_logs(stack: Stack) -> None:
    stored = read_credentials(stack.state_dir)
    assert stored is not None
    _, secret = stored
    status = stack_status(stack.state_dir)
    texts = {
        "status.summary": status.summary(),
        "status.repr": repr(status),
        "info.summary": stack.info.summary(),
        "info.repr": repr(stack.info),
        "stack.json": (stack.state_dir / "stack.json").read_text(),
    }
    for path in [*(stack.state_dir / "pids").glob("*"), *(stack.state_dir / "logs").glob("*")]:
        texts[str(path)] = path.read_text(errors="replace")
    for where, text in texts.items():
        assert secret not in text, f"secret leaked into {where}"


def test_down_stops_exactly_our_processes_and_keeps_data(
    stack: Stack, seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups = _stack_processes(stack.state_dir)
    ours = [p for members in groups.values() for p in members]
    assert {stack.info.services["s3"].pid, stack.info.services["mlflow"].pid} <= {p.pid for p in ours}
    bystander = psutil.Process(seaweedfs.record.pid if seaweedfs.record else -1)

    stopped = stack_down(stack.state_dir)

    assert len(stopped) == 2
    assert [p.pid for p in ours if procs.alive(p)] == []
    # Another SeaweedFS on the machine (the session fixture) is untouched.
    assert procs.alive(bystander) and seaweedfs.healthy()
    assert (stack.state_dir / "s3").is_dir() and (stack.state_dir / "mlflow" / "mlflow.db").is_file()
    status = stack_status(stack.state_dir)
    assert not status.running and all(not s.healthy for s in status.services.values())
    assert not list((stack.state_dir / "pids").glob("*.json"))
    _clear_client_env(monkeypatch)
    monkeypatch.setenv("STAMP_HOME", str(stack.state_dir))
    assert get_settings().s3_endpoint is None  # a stopped stack is not an endpoint
    assert stack_down(stack.state_dir) == []  # nothing left to stop


def test_up_after_down_reuses_data_and_cleans_stale_pid_file(stack: Stack) -> None:
    # A pid file whose process is gone (e.g. after a reboot) must not block the next up.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = procs.ProcRecord("mlflow", dead.pid, dead.pid, 1.0, "mlflow-stale", "python")
    procs.write_record(stack.state_dir / "pids" / "mlflow.json", stale)

    info = stack_up(stack.config)
    assert all(s.state == "started" for s in info.services.values())
    assert any("stale pid file" in note for note in info.notes)
    client = stack.s3().client()
    # Same credentials file, same data directory: what was written before down is still there.
    assert client.get_object(Bucket="stamp", Key="hello.txt")["Body"].read() == b"hi"
    # The module fixture's finally stops this second incarnation.


JOB_SCRIPT = """
import os, sys
import ray, stamp_core
ray.init()
print("JOB-OK", ray.get(ray.remote(lambda: 41 + 1).remote()), os.path.dirname(sys.executable))
"""

DRIVER_SCRIPT = """
from pipeline.settings import get_settings, load_stack_credentials
settings = get_settings()
load_stack_credentials(settings.state_dir)  # before `import ray`
import ray
ray.init(address=settings.ray_address)
print("DRIVER-OK", ray.get(ray.remote(lambda: 7).remote()))
"""


@pytest.mark.slow
def test_ray_head_runs_a_job_and_leaves_nothing_behind(tmp_path: Path) -> None:
    config = _free_config(tmp_path / "home", ray_head=True, ray_num_cpus=1)
    info = None
    try:
        info = stack_up(config)
        ray = info.services["ray"]
        assert ray.state == "started"
        stack_json = json.loads((config.state_dir / "stack.json").read_text())
        ray_entry = stack_json["services"]["ray"]
        token = (config.state_dir / "ray_auth_token").read_text().strip()
        assert stat.S_IMODE((config.state_dir / "ray_auth_token").stat().st_mode) == 0o600
        assert token not in json.dumps(stack_json) and token not in info.summary()
        assert info.client_env["RAY_AUTH_MODE"] == "token"

        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        job_env = {**env, **ray_entry["client_env"]}
        ray_cli = str(Path(sys.executable).parent / "ray")
        job = subprocess.run(
            [ray_cli, "job", "submit", "--address", ray_entry["dashboard_url"], "--",
             "python", "-c", JOB_SCRIPT],
            env=job_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        # The job ran the project's venv python and reached the cluster it was submitted to.
        assert f"JOB-OK 42 {Path(sys.executable).parent}" in job.stdout
        # A driver outside the cluster: settings + credentials from the state dir, then Ray.
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER_SCRIPT],
            env={**env, "STAMP_HOME": str(config.state_dir)}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        assert "DRIVER-OK 7" in driver.stdout

        # Without the token the dashboard refuses.
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(f"{ray_entry['dashboard_url']}/api/version", timeout=5)
        assert excinfo.value.code == 401

        record = procs.read_record(config.state_dir / "pids" / "ray.json")
        assert record is not None
        ray_group = _stack_processes(config.state_dir)["ray"]
        assert len(ray_group) > 3  # gcs, raylet, dashboard, agents...
        stopped = stack_down(config.state_dir)
        info = None
        assert any(line.startswith("Ray head") for line in stopped)
        assert [p.pid for p in ray_group if procs.alive(p)] == []
        # Nothing carrying the head's marker survives anywhere, whatever its process group.
        assert procs.processes_with_marker(record.marker) == []
    finally:
        if info is not None:
            stack_down(config.state_dir)
        temp_dir = get_ray_temp_dir(config.state_dir)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def get_ray_temp_dir(state_dir: Path) -> Path | None:
    """Ray's temp dir may live outside the state dir (socket path limits); tests clean it."""
    try:
        return Path(json.loads((state_dir / "stack.json").read_text())["services"]["ray"]["temp_dir"])
    except (OSError, ValueError, KeyError):
        return None


# The session fixtures in tests/conftest.py, which the rest of the suite builds on.


def test_seaweedfs_fixture_sets_standard_env(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    import boto3

    assert os.environ["AWS_ENDPOINT_URL_S3"] == seaweedfs.endpoint_url
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == seaweedfs.endpoint_url
    # A client built only from the standard env, the way pipeline code builds them.
    client = boto3.client("s3")
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"x")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"x"
    anonymous = urllib.request.Request(f"{seaweedfs.endpoint_url}/{s3_bucket}/c", data=b"y", method="PUT")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(anonymous, timeout=5)


def test_mlflow_server_fixture_stores_artifacts_in_seaweedfs(mlflow_server: str, seaweedfs: SeaweedFS) -> None:
    from mlflow.tracking import MlflowClient

    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server
    client = MlflowClient()  # from the env, as pipeline code would
    run = client.create_run(client.create_experiment(f"fixture-{os.getpid()}-{id(client)}"))
    client.log_text(run.info.run_id, "fixture", "f.txt")
    keys = [
        o["Key"]
        for o in seaweedfs.client().list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])
    ]
    assert any(run.info.run_id in k and k.endswith("/f.txt") for k in keys)


def test_ray_local_fixture_is_private_and_loopback(ray_local: None) -> None:
    import ray

    assert ray.is_initialized()
    # num_cpus=0: this checks privacy and loopback, not free capacity (see the Tune leak note)
    assert ray.get(ray.remote(num_cpus=0)(lambda: 6 * 7).remote()) == 42
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
