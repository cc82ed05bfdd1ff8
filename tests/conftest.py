"""Session fixtures backed by real services: SeaweedFS S3, an MLflow server, a private Ray.

The fixtures drive the same classes as `stamp stack up` (pipeline.stack), on free ports in
temporary directories with random credentials, and stop exactly the processes they started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Ray reads this when it is imported and otherwise advertises (and binds) the machine's
# routable IP even for a local instance; loopback only, like every other service here.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pipeline.stack import MlflowServer, S3Credentials, SeaweedFS, SeaweedPorts, procs  # noqa: E402 - after the Ray switch above

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _private_stamp_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never see (or write to) a developer's running ./.stamp stack."""
    home = tmp_path_factory.mktemp("stamp-home-session")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STAMP_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running SeaweedFS with random keys; the standard AWS env points at it for the session."""
    import boto3

    root = tmp_path_factory.mktemp("seaweedfs")
    creds = S3Credentials.generate()
    server = SeaweedFS(
        data_dir=root / "data",
        log_path=root / "weed.log",
        ports=SeaweedPorts.from_s3_port(procs.free_port_block(SeaweedPorts.offsets())),
        credentials=creds,
    )
    server.start(timeout=60)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "STAMP_S3_ENDPOINT"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ACCESS_KEY_ID", creds.access_key_id)
            mp.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_access_key)
            mp.setenv("AWS_ENDPOINT_URL_S3", server.endpoint_url)
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("MLFLOW_S3_ENDPOINT_URL", server.endpoint_url)
            # boto3's default session caches the credentials it first saw; make it re-read
            # the env now and again after we restore it.
            boto3.DEFAULT_SESSION = None
            yield server
    finally:
        boto3.DEFAULT_SESSION = None
        server.stop()


@pytest.fixture()
def s3_bucket(seaweedfs: SeaweedFS) -> str:
    """A fresh, uniquely named, empty bucket on the session's SeaweedFS."""
    name = f"test-{secrets.token_hex(6)}"
    seaweedfs.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of an MLflow server (sqlite + artifacts on the session's SeaweedFS)."""
    root = tmp_path_factory.mktemp("mlflow")
    bucket = "mlflow-artifacts"
    seaweedfs.ensure_bucket(bucket)
    (port,) = procs.free_ports(1)
    server = MlflowServer(
        backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifacts_destination=f"s3://{bucket}/mlflow",
        port=port,
        s3_endpoint=seaweedfs.endpoint_url,
        credentials=seaweedfs.credentials,
        log_path=root / "mlflow.log",
        workers=1,
    )
    server.start(timeout=120)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", server.tracking_uri)
            yield server.tracking_uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local(seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private in-process Ray instance (never attaches to, or stops, another cluster).

    It depends on ``seaweedfs`` because Ray workers inherit the environment Ray starts with:
    the S3 endpoint and credentials must be set before ``ray.init``.
    """
    import ray

    token = tmp_path_factory.mktemp("ray-auth") / "token"
    procs.write_private(token, secrets.token_hex(32))
    with pytest.MonkeyPatch.context() as mp:
        # ray.init() turns token auth on and, with no token anywhere, writes ~/.ray/auth_token;
        # a token file of our own keeps the home directory untouched. RAY_AUTH_MODE is left to
        # ray.init(): set by hand after `import ray` the driver would not send the token.
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
            # setenv first so the original (maybe absent) value is restored: ray.init writes
            # RAY_AUTH_MODE into os.environ itself.
            mp.setenv(name, "")
            mp.delenv(name)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
        )
        try:
            _check_workers_see(seaweedfs)
            yield
        finally:
            ray.shutdown()


def _check_workers_see(seaweedfs: SeaweedFS) -> None:
    """Ray workers must inherit the S3 credentials: they are only set if SeaweedFS came first."""
    import ray

    @ray.remote(num_cpus=0)
    def worker_key() -> str | None:
        return os.environ.get("AWS_ACCESS_KEY_ID")

    if ray.get(worker_key.remote()) != seaweedfs.credentials.access_key_id:
        raise RuntimeError("Ray workers do not see the SeaweedFS credentials: start `seaweedfs` before `ray_local`")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The shared real datasets (mnist.npz, fashion_mnist.npz), next to the repository."""
    path = (REPO_ROOT.parent / "shared" / "datasets").resolve()
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path} (expected ../shared/datasets next to the repo)")
    return path


@pytest.fixture()
def unprivileged_prefix() -> list[str]:
    """Command prefix under which permission bits bind (skips when that cannot be arranged).

    root ignores a directory's mode; with these capabilities dropped it obeys it like anyone.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    prefix = [str(setpriv), "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    if setpriv is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: no directory is read-only")
    return prefix


@pytest.fixture(scope="module")
def two_node_cluster(seaweedfs: SeaweedFS, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Ray head and one worker node, each its own `ray start` processes on 127.0.0.1.

    Both nodes carry the session's S3 endpoint and credentials and the MLflow URI in their
    environment (a real cluster's Secret), 2 logical CPUs each, the label ``stamp-node=<name>``
    and the resource ``stamp-node-<name>``. Lost nodes are noticed in ~3 s (fast health checks).
    Module-scoped: a test may kill a node and add one (``add_worker``); everything the cluster
    started is stopped by pid at the end, and no process carrying its markers may survive.
    """
    from pipeline.settings import DEFAULT_REGION
    from pipeline.stack.cluster import ClusterSpec, LocalCluster

    root = tmp_path_factory.mktemp("two-node")
    job_env = {
        **seaweedfs.credentials.env(),
        "AWS_ENDPOINT_URL_S3": seaweedfs.endpoint_url,
        "MLFLOW_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "STAMP_HOME": str(root / "stamp-home"),
        # Ray Train's run/attempt/worker records in the dashboard: which node each worker ran on.
        "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    }
    cluster = LocalCluster(ClusterSpec(root=root, workers=1, cpus_per_node=2, job_env=job_env,
                                       fast_failure_detection=True, timeout_s=240))
    cluster.start()
    try:
        yield cluster
    finally:
        markers = [svc.record.marker for svc in [cluster.head, *cluster.workers] if svc.record]
        cluster.stop()
        leftovers = [p.pid for m in markers for p in procs.processes_with_marker(m)]
        assert not leftovers, f"processes of the two-node cluster survived stop(): {leftovers}"
