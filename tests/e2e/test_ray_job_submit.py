"""End to end: `ray job submit` of a tiny meta_train to the head that `stamp stack up` starts.

This is the path a user takes on one machine (and, with another address, on a cluster): the stack
runs SeaweedFS, MLflow and a token-protected Ray head; datasets are ingested with the CLI; the job
ships the repository as its working dir and finds S3 and MLflow through the head's environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stack import SeaweedPorts, StackConfig, procs, stack_down, stack_up

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _free_config(state_dir: Path) -> StackConfig:
    mlflow_port, ray_port, dashboard_port = procs.free_ports(3)
    return StackConfig(
        state_dir=state_dir,
        s3_port=procs.free_port_block(SeaweedPorts.offsets()),
        mlflow_port=mlflow_port,
        ray_port=ray_port,
        ray_dashboard_port=dashboard_port,
        ray_head=True,
        ray_num_cpus=2,
        mlflow_workers=1,
        bucket="stamp-e2e",
    )


def _client_env(state_dir: Path) -> dict[str, str]:
    """A user's shell: nothing but STAMP_HOME points at the stack (no AWS/MLflow/Ray variables)."""
    drop = ("RAY_", "AWS_", "MLFLOW_", "STAMP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["STAMP_HOME"] = str(state_dir)
    return env


def test_meta_train_submitted_as_a_ray_job_succeeds(tmp_path: Path) -> None:
    state_dir = tmp_path / "home"
    config = _free_config(state_dir)
    env = _client_env(state_dir)
    info = None
    try:
        info = stack_up(config)
        stack_json = json.loads((state_dir / "stack.json").read_text())
        ray_entry = stack_json["services"]["ray"]

        ingest = subprocess.run(
            [sys.executable, "-m", "pipeline.apps.cli", "ingest", "procedural:blobs?n=30&test=10",
             "procedural:stripes?n=30&test=10", "--shard-size", "100"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert ingest.returncode == 0, ingest.stdout[-2000:] + ingest.stderr[-2000:]

        overrides = [
            f"steps={STEPS}", "checkpoint_every=2", "report_every=2", "run_name=e2e-submit",
            "data.sources=[blobs,stripes]", "scaling.num_workers=2",
            "episodes.support_per_class=4", "episodes.max_support=20", "episodes.query_size=8",
            "validation.every=4", "validation.tasks=1", "validation.ways=2", "validation.shots=4",
            "validation.test_per_class=4",
        ]  # fmt: skip
        submit = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_entry["dashboard_url"],
             "--working-dir", str(REPO_ROOT), "--",
             "python", "jobs/meta_train.py", "--config", "jobs/configs/meta_train_small.yaml", *overrides],
            env={**env, **ray_entry["client_env"]}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-2000:]

        # The job's JSON summary is the last JSON line it printed.
        summary = json.loads([ln for ln in submit.stdout.splitlines() if ln.startswith("{")][-1])
        assert summary["run"] == "e2e-submit" and summary["step"] == STEPS and summary["start_step"] == 0
        # Outputs went to the stack's state dir (the head's STAMP_HOME), not the unpacked working dir.
        pruner_dir = Path(summary["pruner_dir"])
        assert pruner_dir.is_relative_to(state_dir), pruner_dir
        assert (pruner_dir / "pruner.json").is_file() and (pruner_dir / "pruner_state_dict.pt").is_file()

        # Metrics reached the stack's MLflow server through the head's environment.
        from mlflow.tracking import MlflowClient

        run = MlflowClient(stack_json["services"]["mlflow"]["endpoint"]).get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert {"ce", "expected_macs_ratio", "data_wait_fraction"} <= set(run.data.metrics)
        assert run.data.params.get("steps") == str(STEPS)
    finally:
        if info is not None:
            stack_down(state_dir)
        temp = json.loads((state_dir / "stack.json").read_text())["services"].get("ray", {}).get("temp_dir") \
            if (state_dir / "stack.json").is_file() else None
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
