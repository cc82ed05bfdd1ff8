"""A multi-node Ray cluster on one machine: a head plus worker nodes, each its own `ray start` processes.

This is how Ray's own tests exercise multi-node behaviour without several machines, and it is
what STAMP's two-node tests and `stamp stack up --nodes N` use. Every node binds 127.0.0.1, has
its own temp (session) directory under a short private root (so it never meets another Ray
instance's session on the machine), carries the stack's S3 and MLflow variables in its
environment (as a real cluster's nodes get them from a Secret), a label ``stamp-node=<name>``
and a custom resource ``stamp-node-<name>``. :meth:`LocalCluster.stop` stops exactly the
processes it started, by their ownership records (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stack import procs
from pipeline.stack.services import LOOPBACK, NodeShape, RayHead, RayWorkerNode, StackError

#: label key every node of a LocalCluster carries (value: the node's name).
NODE_LABEL = "stamp-node"
#: A busy 2-core machine can take a minute to start a node's agents and dashboard; Ray's default
#: waits for them (10-60 s) are shorter, and the raylet then aborts the whole node.
SLOW_MACHINE_TOLERANCE = {
    "RAY_raylet_start_wait_time_s": "180",
    "RAY_agent_register_timeout_ms": "300000",
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
}
#: Ray system settings that make a lost node noticed in seconds rather than ~30 s (tests, demos).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def node_resource(name: str) -> str:
    """The custom resource a node named ``name`` offers (one unit): placement by resource request."""
    return f"{NODE_LABEL}-{name}"


@dataclass
class ClusterSpec:
    """Shape of a local cluster; ``job_env`` is what every node's processes (and so jobs) inherit."""

    root: Path
    workers: int = 1
    cpus_per_node: int = 1
    job_env: dict[str, str] = field(default_factory=dict)
    fast_failure_detection: bool = False
    timeout_s: float = 120.0
    #: tries per worker node start (see :meth:`LocalCluster.add_worker`).
    start_attempts: int = 3


class LocalCluster:
    """A Ray head and worker nodes on 127.0.0.1, started and stopped by pid.

    ``root`` holds the logs and the token; the session directories live under a short directory
    in the system temp dir (Ray's socket paths must fit the 107-byte AF_UNIX limit).
    """

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.root = spec.root
        self.root.mkdir(parents=True, exist_ok=True)
        self.session_root = Path(tempfile.mkdtemp(prefix="stamp-rc-"))
        gcs, dashboard = procs.free_ports(2)
        for _ in range(20):  # the Ray client server takes GCS port + 1
            if not procs.port_in_use(gcs + 1):
                break
            gcs, dashboard = procs.free_ports(2)
        self.head = RayHead(
            port=gcs,
            dashboard_port=dashboard,
            temp_dir=self.session_root / "head",
            token_path=self.root / "ray_auth_token",
            log_path=self.root / "logs" / "ray-head.log",
            num_cpus=spec.cpus_per_node,
            job_env=dict(spec.job_env),
            node=self._shape("head"),
        )
        self.workers: list[RayWorkerNode] = []
        self._started: list[RayHead | RayWorkerNode] = []
        self._count = 0

    def _shape(self, name: str) -> NodeShape:
        env = dict(SLOW_MACHINE_TOLERANCE)
        if self.spec.fast_failure_detection:
            env.update(FAST_FAILURE_DETECTION)
        return NodeShape(resources={node_resource(name): 1.0}, labels={NODE_LABEL: name}, env=env)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalCluster:
        """Start the head and ``spec.workers`` worker nodes; wait until every node is alive."""
        try:
            self._started.append(self.head)
            self._start_node(self.head)
            for _ in range(self.spec.workers):
                self.add_worker(wait=False)
            self.wait_for_nodes(1 + self.spec.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, wait: bool = True) -> RayWorkerNode:
        """Start one more worker node (``worker-1``, ``worker-2``, ...), e.g. to replace a lost one."""
        self._count += 1
        name = f"worker-{self._count}"
        node = RayWorkerNode(self.head, name, self.session_root / name, self.root / "logs" / f"ray-{name}.log",
                             num_cpus=self.spec.cpus_per_node, node=self._shape(name))
        self._started.append(node)
        self._start_node(node)
        self.workers.append(node)
        if wait:
            self.wait_for_nodes(len(self.alive_workers()) + 1)
        return node

    def _start_node(self, node: RayHead | RayWorkerNode) -> None:
        for attempt in range(1, self.spec.start_attempts + 1):
            try:
                node.start(self.spec.timeout_s)
                return
            except StackError:
                # `ray start` gives a new raylet a fixed 30 s to register with the GCS, which a
                # heavily loaded machine can exceed; the failed start stopped its own processes.
                if attempt == self.spec.start_attempts:
                    raise

    def alive_workers(self) -> list[RayWorkerNode]:
        return [w for w in self.workers if w.is_running()]

    def kill_raylet(self, node: RayWorkerNode) -> int:
        """SIGKILL the node's raylet by the pid recorded at start (a machine lost, not a clean stop)."""
        pid = node.raylet_pid
        if pid is None:
            raise StackError(f"{node.name}: no running raylet to kill")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> list[int]:
        """Stop every process this cluster started (worker nodes first, the head last)."""
        stopped: list[int] = []
        for svc in reversed(self._started):
            stopped += svc.stop()
        self._started.clear()
        shutil.rmtree(self.session_root, ignore_errors=True)
        return stopped

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what clients need

    @property
    def address(self) -> str:
        return self.head.address

    @property
    def dashboard_url(self) -> str:
        return self.head.dashboard_url

    def client_env(self) -> dict[str, str]:
        """Variables a `ray job submit` client (or an attached driver) needs; paths, no secrets."""
        return {**self.head.client_env(), "RAY_ADDRESS": self.dashboard_url}

    def api(self, path: str) -> Any:
        """GET ``path`` from the head's dashboard (jobs, nodes, Train runs) with the cluster's token."""
        token = self.head.token_path.read_text().strip()
        req = urllib.request.Request(f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read().decode())

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the head knows (alive and dead), from the dashboard's state API."""
        data = self.api("/api/v0/nodes?limit=1000&detail=true")
        return list(data["data"]["result"]["result"])

    def alive_node_names(self) -> list[str]:
        return sorted(n.get("labels", {}).get(NODE_LABEL, "?") for n in self.nodes() if n.get("state") == "ALIVE")

    def wait_for_nodes(self, count: int, timeout: float | None = None) -> list[str]:
        """Wait until exactly ``count`` nodes are alive; returns their names."""
        timeout = self.spec.timeout_s if timeout is None else timeout
        names: list[str] = []

        def ready() -> bool:
            nonlocal names
            try:
                names = self.alive_node_names()
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                return False
            return len(names) == count

        if not procs.wait_until(ready, timeout, interval=0.5):
            raise StackError(f"the Ray cluster at {self.address} has nodes {names} alive, not {count}, "
                             f"after {timeout:.0f} s; logs in {self.root / 'logs'}")
        return names

    def wait_for_node_dead(self, name: str, timeout: float = 60.0) -> float:
        """Wait until the head marks node ``name`` dead; returns the monotonic time it noticed."""
        def dead() -> bool:
            try:
                return any(n.get("labels", {}).get(NODE_LABEL) == name and n.get("state") == "DEAD"
                           for n in self.nodes())
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                return False

        if not procs.wait_until(dead, timeout, interval=0.25):
            raise StackError(f"the Ray head did not mark node {name} dead within {timeout:.0f} s")
        return time.monotonic()

    def describe(self) -> str:
        lines = [f"Ray cluster on {LOOPBACK}: head {self.address}, dashboard {self.dashboard_url}"]
        for svc in [self.head, *self.workers]:
            pid = svc.record.pid if svc.record and svc.is_running() else None
            lines.append(f"  {svc.name:<10} {'running' if pid else 'stopped':<8} pid {pid}  log {svc.log_path}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# `stamp stack cluster` / `python -m pipeline.stack.cluster`: a multi-node cluster next to a running embedded stack


def stack_job_env(state_dir: Path) -> dict[str, str]:
    """The variables a node needs to reach the embedded stack in ``state_dir`` (S3, MLflow, outputs)."""
    from pipeline.settings import DEFAULT_REGION, get_settings, load_stack_credentials

    load_stack_credentials(state_dir)
    settings = get_settings()
    if not settings.s3_endpoint or not os.environ.get("AWS_ACCESS_KEY_ID"):
        raise StackError(f"no running stack in {state_dir} (S3 endpoint or credentials missing): run `stamp stack up`")
    return {
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        "AWS_ENDPOINT_URL_S3": settings.s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint,
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", DEFAULT_REGION),
        "MLFLOW_TRACKING_URI": settings.mlflow_uri,
        "STAMP_BUCKET": settings.bucket,
        "STAMP_HOME": str(state_dir),
    }


def run_cluster(nodes: int = 2, cpus_per_node: int = 1) -> None:
    """Start a Ray head plus ``nodes - 1`` worker nodes on 127.0.0.1 wired to the running stack's S3 and
    MLflow; print how to submit to it; stop exactly its processes on Ctrl-C / SIGTERM.

    Args:
        nodes: Ray nodes in all, head included.
        cpus_per_node: logical CPUs each node offers.
    """
    from pipeline.settings import state_dir_from_env

    if nodes < 1 or cpus_per_node < 1:
        raise StackError(f"nodes={nodes}, cpus_per_node={cpus_per_node}: both must be >= 1")
    state_dir = state_dir_from_env()
    cluster = LocalCluster(ClusterSpec(root=state_dir / "cluster", workers=nodes - 1,
                                       cpus_per_node=cpus_per_node, job_env=stack_job_env(state_dir)))
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with cluster:
        print(cluster.describe())
        env = " ".join(f"{k}={v}" for k, v in cluster.client_env().items())
        print(f"submit jobs with:\n  {env} ray job submit --working-dir . -- python jobs/meta_train.py "
              "--config jobs/configs/meta_train_small.yaml storage_path=s3://BUCKET/ray_results "
              "scaling.placement_strategy=STRICT_SPREAD\nCtrl-C stops the cluster.", flush=True)
        while not stop:
            time.sleep(0.5)


if __name__ == "__main__":
    import typer

    # `python -m pipeline.stack.cluster --nodes N --cpus-per-node C`, the same as `stamp stack cluster`.
    typer.run(run_cluster)
