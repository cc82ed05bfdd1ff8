"""pipeline.apps.terminal: library output to a log file, our own output to the terminal."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

# What a CLI process does: C++ code writing to descriptor 2 (Ray's core worker), a Python logger
# set up before the block (MLflow), print() from a log monitor thread (Ray's forwarded worker
# output), a child process, and our own console lines.
SCRIPT = """
import logging, os, subprocess, sys
from pathlib import Path
from pipeline.apps.terminal import route_output

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log = None if sys.argv[1] == "-" else Path(sys.argv[1])
with route_output(log) as term:
    progress, results = term.consoles()
    os.write(2, b"[2026-01-01 E 1 1] core_worker.cc:2465: Actor with class name: PreemptionWatcher\\n")
    logging.getLogger("mlflow.store").info("Successfully registered model")
    print("(RayTrainWorker pid=42) step 3 loss 0.5")
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child noise\\\\n')"], check=True)
    progress.print("stage 1 done")
    results.print("| table |")
print("after the block")
"""
LIBRARY = ("core_worker.cc", "Successfully registered model", "(RayTrainWorker pid=42)", "child noise")


def run(log_arg: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    return subprocess.run([sys.executable, "-c", SCRIPT, log_arg], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


def test_library_lines_go_to_the_log_file_and_ours_to_the_terminal(tmp_path: Path) -> None:
    log = tmp_path / "run" / "logs" / "cli.log"
    done = run(str(log), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "stage 1 done" in done.stderr and "| table |" in done.stdout
    assert "after the block" in done.stdout  # descriptors restored when the block ends
    for line in LIBRARY:
        assert line not in done.stdout + done.stderr, line
    text = log.read_text()
    for line in LIBRARY:
        assert line in text, line
    assert "stage 1 done" not in text and "| table |" not in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_verbose_leaves_everything_on_the_terminal(tmp_path: Path) -> None:
    done = run("-", tmp_path)
    assert done.returncode == 0, done.stderr
    for line in LIBRARY:
        assert line in done.stdout + done.stderr, line
    assert "stage 1 done" in done.stderr and "| table |" in done.stdout
    assert not list(tmp_path.rglob("*.log"))
