"""Process helpers for the embedded stack: ports, spawning, ownership records, stopping.

Every process we start gets a unique marker in its environment. Children inherit it, so
"ours" means: same process group as the one we started *and* carrying our marker. That
survives pid reuse and never touches a process someone else started (no `ray stop`,
no pkill by name).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

MARKER_ENV = "STAMP_SERVICE_MARKER"

# Variables that would make boto3 ignore or mis-sign with the static keys we hand a service.
_AWS_CONFLICTING_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


@dataclass(frozen=True)
class ProcRecord:
    """What we need to find (and only find) the processes of one service later."""

    service: str
    pid: int
    pgid: int
    create_time: float
    marker: str
    cmd: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ProcRecord:
        data = json.loads(text)
        return cls(
            service=str(data["service"]),
            pid=int(data["pid"]),
            pgid=int(data["pgid"]),
            create_time=float(data["create_time"]),
            marker=str(data["marker"]),
            cmd=str(data.get("cmd", "")),
        )


def new_marker(service: str) -> str:
    return f"{service}-{secrets.token_hex(8)}"


def service_env(
    base: Mapping[str, str] | None = None,
    *,
    marker: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a child service: the caller's env, our marker, and explicit settings."""
    env = dict(os.environ if base is None else base)
    for name in _AWS_CONFLICTING_ENV:
        env.pop(name, None)
    env.update(extra or {})
    env[MARKER_ENV] = marker
    return env


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a detached service: own session (survives the CLI and its terminal), log to file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {cmd[0]}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def record_for(service: str, pid: int, pgid: int, marker: str) -> ProcRecord:
    proc = psutil.Process(pid)
    return ProcRecord(
        service=service,
        pid=pid,
        pgid=pgid,
        create_time=proc.create_time(),
        marker=marker,
        cmd=proc.name(),
    )


def _has_marker(proc: psutil.Process, marker: str) -> bool:
    try:
        return proc.environ().get(MARKER_ENV) == marker
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an exited child nobody reaped yet counts as gone)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def is_alive(record: ProcRecord) -> bool:
    """The recorded main process still runs and is still the one we started (pid reuse)."""
    try:
        proc = psutil.Process(record.pid)
        return (
            abs(proc.create_time() - record.create_time) < 1.0
            and alive(proc)
            and _has_marker(proc, record.marker)
        )
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def owned_processes(record: ProcRecord) -> list[psutil.Process]:
    """All live processes of the recorded group that carry the record's marker."""
    found: list[psutil.Process] = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != record.pgid:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        if alive(proc) and _has_marker(proc, record.marker):
            found.append(proc)
    return found


def processes_with_marker(marker: str) -> list[psutil.Process]:
    """Every live process carrying the marker, whatever its group (used to prove clean-up)."""
    return [p for p in psutil.process_iter() if alive(p) and _has_marker(p, marker)]


def terminate(procs: Iterable[psutil.Process], timeout: float = 10.0) -> list[int]:
    """SIGTERM, wait, SIGKILL what is left, wait again. Returns the pids that were signalled."""
    targets = [p for p in procs if alive(p)]
    for proc in targets:
        try:
            proc.send_signal(signal.SIGTERM)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    _wait_gone(targets, timeout)
    leftovers = [p for p in targets if alive(p)]
    for proc in leftovers:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    _wait_gone(leftovers, 5.0)
    return [p.pid for p in targets]


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> None:
    # psutil.wait_procs reaps our own children; zombies of someone else's count as gone.
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        _, pending = psutil.wait_procs(pending, timeout=0.2)
        pending = [p for p in pending if alive(p)]


def stop_record(
    record: ProcRecord,
    timeout: float = 10.0,
    order: Callable[[psutil.Process], int] | None = None,
) -> list[int]:
    """Stop every process of a record's group that carries its marker.

    ``order`` buckets the processes (lower first), for daemons that must go down in sequence.
    """
    procs = owned_processes(record)
    if not procs:
        return []
    if order is None:
        return terminate(procs, timeout)
    stopped: list[int] = []
    for rank in sorted({order(p) for p in procs}):
        stopped += terminate([p for p in procs if order(p) == rank], timeout)
    # Children forked while we were stopping the first buckets.
    stopped += terminate(owned_processes(record), timeout)
    return stopped


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so only a live listener makes this bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports the OS considers free right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port_block(
    offsets: Sequence[int],
    host: str = "127.0.0.1",
    low: int = 20000,
    high: int = 22700,
    attempts: int = 200,
) -> int:
    """A base port such that base+offset is free for every offset (SeaweedFS derives its ports).

    The default range keeps base+10000 below Linux's ephemeral ports (32768+), where outgoing
    connections could grab a port between our check and the server's bind.
    """
    rng = secrets.SystemRandom()
    for _ in range(attempts):
        base = rng.randrange(low, high)
        if all(not port_in_use(base + off, host) for off in offsets):
            return base
    raise RuntimeError(f"no free block of ports for offsets {list(offsets)} in {low}-{high}")


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    interval: float = 0.25,
    abort: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``check`` until it is true, the timeout passes, or ``abort`` says to give up."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if (abort is not None and abort()) or time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: Path, lines: int = 30, redact: Iterable[str] = ()) -> str:
    """Last lines of a log, with the given secrets blanked out (error messages quote logs)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    out = "\n".join(text.splitlines()[-lines:])
    for secret in redact:
        if secret:
            out = out.replace(secret, "***")
    return out


def write_private(path: Path, text: str) -> None:
    """Write a file that only the owner can read, without a window where it is wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_json(path: Path, data: object) -> None:
    """Atomic JSON write so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: Path) -> ProcRecord | None:
    try:
        return ProcRecord.from_json(path.read_text())
    except (OSError, ValueError, KeyError):
        return None


def write_record(path: Path, record: ProcRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(record.to_json() + "\n")
    os.replace(tmp, path)
