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
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from pipeline.stack import procs
from pipeline.stack.services import (
    DEFAULT_MLFLOW_PORT,
    DEFAULT_RAY_DASHBOARD_PORT,
    DEFAULT_RAY_PORT,
    DEFAULT_S3_PORT,
    MlflowServer,
    Progress,
    RayHead,
    S3Credentials,
    SeaweedFS,
    SeaweedPorts,
    Service,
    StackError,
    _http_ok,
    _ports_message,
    _ray_stop_order,
    _read_token,
)

# AF_UNIX paths are limited to 107 bytes and Ray puts sockets at
# TEMP/session_<date>_<time>_<pid>/sockets/plasma_store (about 65 bytes after TEMP).
_RAY_TEMP_MAX = 40


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


def _live_record(paths: StackPaths, service: str) -> tuple[procs.ProcRecord | None, bool]:
    """(record if its process is ours and alive, whether a stale pid file was found)."""
    record = procs.read_record(paths.pid_file(service))
    if record is None:
        return None, paths.pid_file(service).exists()
    if procs.is_alive(record):
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
        procs.write_private(paths.credentials, creds.to_json())
    return creds


def _recorded(stack: dict[str, Any], service: str) -> dict[str, Any]:
    services = stack.get("services", {})
    svc = services.get(service, {}) if isinstance(services, dict) else {}
    return svc if isinstance(svc, dict) else {}


def _build_services(
    config: StackConfig,
    paths: StackPaths,
    creds: S3Credentials,
    records: dict[str, procs.ProcRecord | None],
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
    procs.write_json(
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
        records: dict[str, procs.ProcRecord | None] = {}
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
                    procs.write_record(paths.pid_file(name), svc.record)
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
            record = procs.read_record(pid_file)
            if record is None:
                continue
            pids = procs.stop_record(record, timeout, order=_ray_stop_order if name == "ray" else None)
            if pids:
                stopped.append(f"{_LABELS[name]}: stopped pids {', '.join(map(str, sorted(pids)))}")
            pid_file.unlink(missing_ok=True)
            entry = _recorded(stack, name)
            if entry:
                entry["running"] = False
                entry["pid"] = None
        if stack:
            stack["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            procs.write_json(paths.stack_file, stack)
    return stopped


def stack_status(state_dir: Path | None = None) -> StackStatus:
    """Per service: running or not, pid, endpoint, and a live health check. Changes nothing."""
    paths = StackPaths((state_dir or state_dir_from_env()).resolve())
    stack = read_stack_file(paths.root)
    statuses: dict[str, ServiceStatus] = {}
    for name in _SERVICE_ORDER:
        entry = _recorded(stack, name)
        record = procs.read_record(paths.pid_file(name))
        running = record is not None and procs.is_alive(record)
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
