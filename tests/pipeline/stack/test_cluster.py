"""Unit tests of the multi-node pieces that need no running Ray: node shape, worker command and env.

The nodes themselves run in tests/e2e/test_two_nodes.py (the ``two_node_cluster`` fixture).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stack import RayHead, StackError
from pipeline.stack.cluster import ClusterSpec, LocalCluster, node_resource, run_cluster, stack_job_env
from pipeline.stack.procs import MARKER_ENV
from pipeline.stack.services import NodeShape, RayWorkerNode


def _head(tmp_path: Path) -> RayHead:
    return RayHead(port=20001, dashboard_port=20003, temp_dir=tmp_path / "t", token_path=tmp_path / "tok",
                   log_path=tmp_path / "head.log", job_env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})


def test_node_shape_flags() -> None:
    shape = NodeShape(resources={node_resource("worker-1"): 1.0}, labels={"stamp-node": "worker-1", "zone": "a"})
    assert shape.flags() == ['--resources={"stamp-node-worker-1": 1.0}', "--labels=stamp-node=worker-1,zone=a"]
    assert NodeShape().flags() == []


def test_worker_node_joins_the_head_on_loopback_with_the_stack_env(tmp_path: Path) -> None:
    head = _head(tmp_path)
    node = RayWorkerNode(head, "worker-1", tmp_path / "w1", tmp_path / "w1.log", num_cpus=2,
                         node=NodeShape(labels={"stamp-node": "worker-1"}, env={"RAY_health_check_period_ms": "1000"}))
    cmd = node.command()
    assert cmd[1].endswith("pipeline/stack/ray_worker_start.py") and cmd[2] == "start"
    assert {"--address=127.0.0.1:20001", "--node-ip-address=127.0.0.1", "--num-cpus=2",
            f"--temp-dir={tmp_path / 'w1'}", "--labels=stamp-node=worker-1"} <= set(cmd)
    assert "--head" not in cmd and not any(a.startswith("--port") for a in cmd)
    env = node.child_env("m-1")
    # Loopback only: the switch stays 0 for the node's processes (the launcher lifts only the CLI guard).
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9" and env["RAY_health_check_period_ms"] == "1000"
    assert env[MARKER_ENV] == "m-1" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")
    assert node.raylet_pid is None  # not started


def test_a_worker_node_needs_a_running_head(tmp_path: Path) -> None:
    node = RayWorkerNode(_head(tmp_path), "worker-1", tmp_path / "w1", tmp_path / "w1.log", num_cpus=1)
    with pytest.raises(StackError, match="worker-1: the Ray head at 127.0.0.1:20001 is not running"):
        node.start(timeout=5)


def test_cluster_session_dirs_are_short_and_private(tmp_path: Path) -> None:
    cluster = LocalCluster(ClusterSpec(root=tmp_path / ("a-rather-long-directory-name" * 3)))
    try:
        # Ray puts unix sockets ~65 bytes below the session root; AF_UNIX paths stop at 107.
        assert len(str(cluster.head.temp_dir)) < 40
        assert cluster.head.node.labels == {"stamp-node": "head"}
        assert cluster.head.node.resources == {"stamp-node-head": 1.0}
    finally:
        assert cluster.stop() == []  # nothing was started, nothing is stopped
    assert not cluster.session_root.exists()


def test_the_cluster_script_needs_a_running_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "STAMP_S3_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StackError, match="no running stack in .*run `stamp stack up`"):
        stack_job_env(tmp_path / "no-stack")


def test_the_cluster_module_takes_the_options_of_stamp_stack_cluster() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.stack.cluster", "--help"], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    assert "--nodes" in proc.stdout and "--cpus-per-node" in proc.stdout


def test_a_cluster_without_nodes_is_refused_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAMP_HOME", str(tmp_path))
    with pytest.raises(StackError, match="nodes=0, cpus_per_node=1: both must be >= 1"):
        run_cluster(nodes=0)
    assert not (tmp_path / "cluster").exists()
