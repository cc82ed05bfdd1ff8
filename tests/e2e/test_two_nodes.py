"""Cluster-shaped runs on one machine: a Ray head plus a worker node, each its own `ray start` processes.

Jobs go in the way a user submits them to a real cluster (`ray job submit --working-dir`), with
checkpoints on S3 (the session's SeaweedFS) so that every node, and a node that replaces a lost
one, reaches them. The tests share one module-scoped cluster and run in file order: the node-loss
test kills the worker node, so it comes last.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from pipeline.data import CHECKPOINT_PREFIX, STATE_FILE
from pipeline.stack.cluster import NODE_LABEL, LocalCluster
from stamp_core import StampPruner
from tests.pipeline.training._jobs import ingest_sources

# The first test also pays for starting the cluster (module fixture): on a loaded 2-core machine
# that alone has taken minutes, so the per-test limit is above the suite's default 600 s.
pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


@pytest.fixture(scope="module")
def cluster_data(seaweedfs: Any) -> tuple[str, str]:
    """(bucket, catalog URL) of the tiny procedural sources on S3, which every node reaches."""
    bucket = f"cluster-{secrets.token_hex(4)}"
    seaweedfs.client().create_bucket(Bucket=bucket)
    return bucket, ingest_sources(f"s3://{bucket}/datasets")


@pytest.fixture(scope="module")
def clean_run(two_node_cluster: LocalCluster, cluster_data: tuple[str, str], seaweedfs: Any,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fault-free 2-worker STRICT_SPREAD run: its job record, train-run record and pruner."""
    bucket, catalog = cluster_data
    job = _submit(two_node_cluster, _overrides("spread", bucket, catalog))
    info = _wait_job(two_node_cluster, job, timeout=600)
    assert info["status"] == "SUCCEEDED", _job_logs(two_node_cluster, job)[-4000:]
    return {"job": job, "summary": _summary(_job_logs(two_node_cluster, job)),
            "pruner": _load_pruner(seaweedfs, bucket, "spread", STEPS, tmp_path_factory.mktemp("clean"))}


# ============================================================================ helpers


def _overrides(run: str, bucket: str, catalog: str, **extra: Any) -> list[str]:
    """A meta-train small enough for a few seconds of steps; 2 workers, one per node."""
    values: dict[str, Any] = {
        "run_name": run, "steps": STEPS, "report_every": 2, "checkpoint_every": 2, "keep_checkpoints": 10,
        "storage_path": f"s3://{bucket}/ray", "data.catalog_url": catalog, "data.sources": "[blobs,stripes]",
        "backbone_kwargs.width": 8, "pruner.embed_dim": 32, "pruner.hidden_dim": 32, "pruner.num_inducing": 8,
        "episodes.ways": "[2,4]", "episodes.support_per_class": 5, "episodes.max_support": 20,
        "episodes.query_size": 16, "validation.enabled": "false", "scaling.num_workers": 2,
        "scaling.cpus_per_worker": 1, "scaling.placement_strategy": "STRICT_SPREAD", "max_failures": 2,
        "mlflow.experiment": "two-node",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _submit(cluster: LocalCluster, overrides: list[str]) -> str:
    """`ray job submit --no-wait` of jobs/meta_train.py; returns the submission id."""
    job = f"stamp-{secrets.token_hex(4)}"
    done = subprocess.run(_client_cmd(cluster, job, overrides, no_wait=True), env=_client_env(cluster),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return job


def _client_cmd(cluster: LocalCluster, job: str, overrides: list[str], no_wait: bool = False) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard_url,
            "--submission-id", job, "--working-dir", str(REPO_ROOT), *(["--no-wait"] if no_wait else []), "--",
            "python", "jobs/meta_train.py", "--config", "jobs/configs/meta_train_small.yaml", *overrides]


def _client_env(cluster: LocalCluster) -> dict[str, str]:
    """A user's shell: the cluster's client variables, no S3 or MLflow secrets (the nodes hold those)."""
    drop = ("RAY_", "AWS_", "MLFLOW_", "STAMP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **cluster.client_env()}


def _job_logs(cluster: LocalCluster, job: str) -> str:
    return str(cluster.api(f"/api/jobs/{job}/logs").get("logs", ""))


def _wait_job(cluster: LocalCluster, job: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.api(f"/api/jobs/{job}")
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info
        assert time.monotonic() < deadline, f"job {job} still {info['status']} after {timeout:.0f} s"
        time.sleep(1.0)


def _summary(logs: str) -> dict[str, Any]:
    """The job's JSON summary: the last line of its output that is a JSON object."""
    lines = [ln for ln in logs.splitlines() if ln.startswith("{")]
    assert lines, logs[-3000:]
    return json.loads(lines[-1])


def _train_run_nodes(cluster: LocalCluster, run: str) -> list[list[str]]:
    """Per attempt of Ray Train run ``run``: the node label of every worker, by rank."""
    names = {n["node_id"]: n.get("labels", {}).get(NODE_LABEL, "?") for n in cluster.nodes()}
    all_runs = _train_runs(cluster)
    runs = [r for r in all_runs if r["name"] == run]
    assert len(runs) == 1, [r["name"] for r in all_runs]
    return [[names[w["node_id"]] for w in sorted(a["workers"], key=lambda w: w["world_rank"])]
            for a in sorted(runs[0]["attempts"], key=lambda a: a["start_time_ns"])]


def _train_runs(cluster: LocalCluster) -> list[dict[str, Any]]:
    """Ray Train V2 runs the head knows (the fixture turns RAY_TRAIN_ENABLE_STATE_TRACKING on)."""
    return list(cluster.api("/api/train/v2/runs/v1")["train_runs"])


def _s3_json(seaweedfs: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        body = seaweedfs.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception:  # noqa: BLE001 - not written yet
        return None
    return json.loads(body)


def _registered_step(seaweedfs: Any, bucket: str, run: str) -> int:
    """The latest checkpoint step Ray Train has registered for ``run`` (0 when none yet)."""
    snap = _s3_json(seaweedfs, bucket, f"ray/{run}/{SNAPSHOT}")
    latest = (snap or {}).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name") or ""
    return int(name[len(CHECKPOINT_PREFIX):]) if name.startswith(CHECKPOINT_PREFIX) else 0


def _load_pruner(seaweedfs: Any, bucket: str, run: str, step: int, dest: Path) -> StampPruner:
    prefix = f"ray/{run}/{CHECKPOINT_PREFIX}{step:08d}/"
    client = seaweedfs.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        rel = obj["Key"][len(prefix):]
        if not rel or rel.endswith("/"):  # directory markers
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    return StampPruner.load(dest)


def _budget_ratios(pruner: StampPruner) -> list[float]:
    """Achieved MACs ratio of the pruner's masks for one fixed task at three budgets."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 32, 32, generator=g)
    labels = torch.arange(24) % 3
    return [(s.macs_pruned / s.macs_full) for s in (pruner.generate(images, labels, macs_ratio=r) for r in (0.3, 0.5, 0.8))]


# ============================================================================ tests


def test_cluster_has_two_labelled_nodes_with_the_stack_env(two_node_cluster: LocalCluster, seaweedfs: Any) -> None:
    nodes = {n["labels"][NODE_LABEL]: n for n in two_node_cluster.nodes() if n["state"] == "ALIVE"}
    assert sorted(nodes) == ["head", "worker-1"]
    for name, node in nodes.items():
        assert node["node_ip"] == "127.0.0.1"
        assert node["resources_total"]["CPU"] == 2
        assert node["resources_total"][f"{NODE_LABEL}-{name}"] == 1
    # Every node's processes carry the stack's S3 endpoint (what their workers inherit).
    for svc in (two_node_cluster.head, *two_node_cluster.workers):
        assert svc.record is not None
        env = psutil.Process(svc.record.pid).environ()
        assert env["AWS_ENDPOINT_URL_S3"] == seaweedfs.endpoint_url
        assert env["AWS_ACCESS_KEY_ID"] == seaweedfs.credentials.access_key_id


def test_meta_train_spreads_over_both_nodes_with_checkpoints_on_s3(
    two_node_cluster: LocalCluster, clean_run: dict[str, Any], cluster_data: tuple[str, str], seaweedfs: Any
) -> None:
    bucket, _ = cluster_data
    summary = clean_run["summary"]
    assert (summary["step"], summary["start_step"]) == (STEPS, 0)
    assert summary["metrics"]["world_size"] == 2
    assert summary["path"].startswith(f"{bucket}/ray/spread")  # the run directory is on S3
    # One worker per node (STRICT_SPREAD), one attempt.
    assert [sorted(a) for a in _train_run_nodes(two_node_cluster, "spread")] == [["head", "worker-1"]]
    keys = {o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=bucket, Prefix="ray/spread/")["Contents"]}
    for step in range(2, STEPS + 1, 2):
        assert f"ray/spread/{CHECKPOINT_PREFIX}{step:08d}/{STATE_FILE}" in keys
        assert f"ray/spread/{CHECKPOINT_PREFIX}{step:08d}/optimizer.pt" in keys
    assert clean_run["pruner"].config.metadata["step"] == STEPS


def test_local_storage_path_on_the_cluster_fails_fast_with_the_reason(
    two_node_cluster: LocalCluster, cluster_data: tuple[str, str], tmp_path: Path
) -> None:
    bucket, catalog = cluster_data
    job = _submit(two_node_cluster, _overrides("local-storage", bucket, catalog, storage_path=str(tmp_path / "ray")))
    start = time.monotonic()
    info = _wait_job(two_node_cluster, job, timeout=300)
    logs = _job_logs(two_node_cluster, job)
    assert info["status"] == "FAILED", logs[-3000:]
    assert "invalid configuration: storage_path: node-local location(s) on a multi-node run" in logs, logs[-3000:]
    assert "this Ray cluster has 2 nodes" in logs and "s3://" in logs
    assert "exit code 2" in (info.get("message") or ""), info
    # Refused before any worker started: no Train run of that name exists.
    assert not [r for r in _train_runs(two_node_cluster) if r["name"] == "local-storage"]
    assert time.monotonic() - start < 120


def test_lost_worker_node_resumes_from_the_s3_checkpoint_on_a_replacement_node(
    two_node_cluster: LocalCluster, clean_run: dict[str, Any], cluster_data: tuple[str, str], seaweedfs: Any,
    tmp_path: Path,
) -> None:
    """Kill the worker node's raylet after the first registered checkpoint; a new node joins; the run finishes.

    The `ray job submit` client is killed at the same moment: the job must outlive its client.
    """
    bucket, catalog = cluster_data
    run = "node-loss"
    job = f"stamp-{secrets.token_hex(4)}"
    timeline: dict[str, float] = {}
    t0 = time.monotonic()
    client = subprocess.Popen(_client_cmd(two_node_cluster, job, _overrides(run, bucket, catalog)),
                              env=_client_env(two_node_cluster), cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while (registered := _registered_step(seaweedfs, bucket, run)) < 2:
            assert client.poll() is None, f"the client exited early ({client.returncode})"
            assert time.monotonic() < deadline, "no checkpoint registered within 600 s"
            time.sleep(0.2)
        victim = two_node_cluster.workers[0]
        two_node_cluster.kill_raylet(victim)
        timeline["kill"] = time.monotonic() - t0
        client.kill()  # the submitting client disconnects at the same moment
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=30)
    timeline["detected"] = two_node_cluster.wait_for_node_dead(victim.name) - t0
    two_node_cluster.add_worker()  # the replacement node (the autoscaler's job on a real cluster)
    timeline["replacement_alive"] = time.monotonic() - t0
    info = _wait_job(two_node_cluster, job, timeout=600)
    timeline["finished"] = time.monotonic() - t0
    logs = _job_logs(two_node_cluster, job)
    assert info["status"] == "SUCCEEDED", logs[-4000:]

    summary = _summary(logs)
    final = _s3_json(seaweedfs, bucket, f"ray/{run}/{CHECKPOINT_PREFIX}{STEPS:08d}/{STATE_FILE}")
    assert final is not None and final["step"] == STEPS
    # The step counter continues from a checkpoint at or after the one registered before the kill:
    # at most one checkpoint interval of work was lost, and the run did not start over.
    resumed = int(final["start_step"])
    assert registered <= resumed < STEPS and resumed % 2 == 0, (registered, resumed)
    assert summary["step"] == STEPS and summary["start_step"] == resumed
    attempts = _train_run_nodes(two_node_cluster, run)
    assert len(attempts) >= 2 and sorted(attempts[0]) == ["head", "worker-1"], attempts
    assert sorted(attempts[-1]) == ["head", "worker-2"], attempts  # the last attempt ran on the new node
    print(f"\nnode-loss timeline (s after submit): {json.dumps({k: round(v, 1) for k, v in timeline.items()})}; "
          f"registered checkpoint at kill: {registered}, resumed at step {resumed}, attempts {attempts}")

    # Same pruner as the fault-free run in shape, and the same budget behaviour.
    pruner = _load_pruner(seaweedfs, bucket, run, STEPS, tmp_path / "pruner")
    clean: StampPruner = clean_run["pruner"]
    assert {k: v.shape for k, v in pruner.state_dict().items()} == {k: v.shape for k, v in clean.state_dict().items()}
    for got, ref, budget in zip(_budget_ratios(pruner), _budget_ratios(clean), (0.3, 0.5, 0.8)):
        assert got <= budget + 1e-6 and ref <= budget + 1e-6
        assert abs(got - ref) <= 0.15, (got, ref, budget)
