"""The private local Ray of :mod:`pipeline.stack.local_ray`: what its workers log without the dashboard."""

from __future__ import annotations

import importlib
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.stack import procs
from pipeline.stack.local_ray import CLEANER_LOGGER

REPO = Path(__file__).resolve().parents[3]

# A detached actor (as Ray Train's cleaner is) warns once through the cleaner's logger and once through another.
_JOB = textwrap.dedent("""
    import logging
    import ray
    from pipeline.stack.local_ray import CLEANER_LOGGER, init_ray

    @ray.remote(num_cpus=0)
    class Warner:
        def warn(self) -> None:
            logging.getLogger(CLEANER_LOGGER).warning("cleaner-noise-7f3a")
            logging.getLogger("pipeline.some_job").warning("job-warning-7f3a")

    init_ray(num_cpus=1)
    actor = Warner.options(lifetime="detached").remote()
    ray.get(actor.warn.remote())
    ray.kill(actor)
    ray.shutdown()
""")


def test_ray_still_names_the_cleaners_logger_as_we_do() -> None:
    module = importlib.import_module(CLEANER_LOGGER)
    assert module.logger.name == CLEANER_LOGGER


@pytest.mark.integration
def test_a_dashboardless_local_ray_drops_only_the_cleaners_warnings(tmp_path: Path) -> None:
    token = tmp_path / "ray-token"
    procs.write_private(token, secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "STAMP_"))}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", _JOB], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "job-warning-7f3a" in output, output[-3000:]  # the workers' logs do reach the driver
    assert "cleaner-noise-7f3a" not in output, output[-3000:]
