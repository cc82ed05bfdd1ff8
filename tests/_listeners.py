"""Which sockets a process tree listens on: the loopback-only check of a local run (tests/e2e/test_demo_e2e.py)."""

from __future__ import annotations

import ipaddress
import subprocess
import time

import psutil


def listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening inet socket in ``root``'s process tree."""
    found = set()
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for p in tree:
        try:
            name = p.name()
            found |= {(name, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # the process ended between the listing and the look
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip  # '::ffff:127.0.0.1' is 127.0.0.1 on a dual-stack socket
    return ip.is_loopback


def watch_listeners(proc: subprocess.Popen, timeout: float, every: float = 0.3) -> set[tuple[str, str, int]]:
    """Sample ``proc``'s tree until it exits (killed, with what it started, after ``timeout`` s); what listened.

    Only processes this call saw in the tree are killed, by pid, and only if they outlive the run.
    """
    root = psutil.Process(proc.pid)
    seen: set[tuple[str, str, int]] = set()
    started: set[psutil.Process] = set()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= listeners(root)
            try:
                started |= set(root.children(recursive=True))
            except psutil.Error:
                pass
            time.sleep(every)
    finally:
        for p in [root, *started]:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait(timeout=60)
    return seen
