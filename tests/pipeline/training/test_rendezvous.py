"""A job run without a cluster address listens on loopback only: Ray's processes and the process group.

``python jobs/pretrain.py`` with no ``RAY_ADDRESS`` and no stack starts a local Ray
(:func:`pipeline.stack.init_ray`) and two Ray Train workers whose gloo process group comes from
:class:`pipeline.training.rendezvous.LoopbackTorchConfig`. While the job runs, every listening
socket of every process in its tree (the driver, GCS, raylet, agents, workers, the rank-0 TCPStore,
gloo) is sampled; all of them must be on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.stack import procs

REPO = Path(__file__).resolve().parents[3]


def _listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
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


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip  # '::ffff:127.0.0.1' is 127.0.0.1 on a dual-stack socket
    return ip.is_loopback


@pytest.mark.integration
@pytest.mark.slow
def test_a_local_job_listens_on_loopback_only(s3_data: tuple[str, str], tmp_path: Path) -> None:
    _, catalog_url = s3_data
    token = tmp_path / "ray-token"
    procs.write_private(token, secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "STAMP_"))}
    # A state dir of its own: no running stack (and so no cluster address) is found.
    env.update(STAMP_HOME=str(tmp_path / "home"), RAY_AUTH_TOKEN_PATH=str(token))
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(REPO / "jobs/configs/pretrain_small.yaml"),
           f"data.catalog_url={catalog_url}", "data.sources=all", "backbone_kwargs.width=8", "epochs=1",
           "batch_size=32", "max_samples_per_dataset=64", "eval_samples=16", "mlflow.enabled=false",
           f"storage_path={tmp_path / 'results'}", "run_name=loopback", "scaling.num_workers=2"]
    job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(job.pid)
    seen: set[tuple[str, str, int]] = set()
    started: set[psutil.Process] = set()
    try:
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            seen |= _listeners(root)
            try:
                started |= set(root.children(recursive=True))
            except psutil.Error:
                pass
            time.sleep(0.3)
        output = job.communicate(timeout=60)[0] if job.poll() is not None else ""
    finally:
        for p in [root, *started]:  # only what this job started, by pid, if anything outlived it
            try:
                p.kill()
            except psutil.Error:
                pass
    assert job.returncode == 0, output[-3000:]
    names = {name for name, _, _ in seen}
    # The sampler saw the whole tree: Ray's own servers and the train workers (where the TCPStore is).
    assert {"gcs_server", "raylet"} <= names, names
    assert any(n.startswith("ray::") for n in names), names
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_the_loopback_check_recognises_loopback_forms() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("::ffff:127.0.0.1") and _is_loopback("::1")
    assert not _is_loopback("::") and not _is_loopback("0.0.0.0") and not _is_loopback("192.0.2.2")


def test_the_listener_scan_sees_a_socket_of_this_process() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert any(p == port and ip == "127.0.0.1" for _, ip, p in _listeners(psutil.Process()))

