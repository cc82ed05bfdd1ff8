"""pipeline.apps.terminal: library output to a log file, our own output to the terminal; one progress
line per stage."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from pipeline.apps.terminal import DURATION_PATTERN, format_duration, stage_progress

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
    logging.getLogger("pipeline.training.tracking").warning("MLflow logging skipped at step 3 (training continues)")
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
    # A warning of our own reaches the terminal in plain words (and stays in the log with the rest).
    assert "warning: MLflow logging skipped at step 3 (training continues)\n" in done.stderr
    assert "WARNING pipeline.training.tracking: MLflow logging skipped" in text


def test_verbose_leaves_everything_on_the_terminal(tmp_path: Path) -> None:
    done = run("-", tmp_path)
    assert done.returncode == 0, done.stderr
    for line in LIBRARY:
        assert line in done.stdout + done.stderr, line
    assert "stage 1 done" in done.stderr and "| table |" in done.stdout
    assert not list(tmp_path.rglob("*.log"))


# ----------------------------------------------------------------------------- stage_progress


def _console(tty: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=tty, width=200, color_system=None), buf


def test_a_stage_off_a_terminal_is_one_final_line_with_count_time_and_figure() -> None:
    console, buf = _console(tty=False)
    with stage_progress(console, "pretrain", 3, "epochs") as line:
        for epoch in (1, 2, 3):
            line.update(epoch, f"loss {1 / epoch:.3f} · {1000 * epoch:,} img/s")
    assert re.fullmatch(r"ok pretrain 3/3 epochs in \d+\.\d s · loss 0\.333 · 3,000 img/s\n", buf.getvalue()), buf.getvalue()


def test_a_stage_on_a_terminal_is_redrawn_in_place_with_eta() -> None:
    console, buf = _console(tty=True)
    with stage_progress(console, "meta-train", 4, "steps") as line:
        for step in (1, 2):
            line.update(step, f"loss {step:.1f}")
            print("(RayTrainWorker pid=42) library line")  # what Ray's log monitor does
            time.sleep(0.6)  # the live line refreshes 4 times a second
    text = buf.getvalue()
    # The live display leaves sys.stdout alone: library output stays where route_output sent it.
    assert "library line" not in text
    assert "\r" in text or "\x1b[2K" in text  # redrawn, not appended
    assert "2/4 steps" in text and re.search(r"ETA 0:00:0\d", text), text  # an estimate once speed is known
    assert re.search(r"ok meta-train 2/4 steps in \d+\.\d s · loss 2\.0\n$", text), text[-300:]


def test_a_failed_stage_says_so_and_the_error_propagates() -> None:
    console, buf = _console(tty=False)
    try:
        with stage_progress(console, "tune", 10, "trial-steps") as line:
            line.update(2, "x")
            raise RuntimeError("boom")
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:  # pragma: no cover - the block raised
        raise AssertionError("the error was swallowed")
    assert re.fullmatch(r"failed tune after \d+\.\d s\n", buf.getvalue()), buf.getvalue()


def test_duration_pattern_matches_every_form_a_stage_line_prints() -> None:
    """Stage-line tests parse durations with DURATION_PATTERN: a stage slowed past a minute (a loaded CI box)
    prints "5 min 24 s", which a seconds-only pattern rejected."""
    printed = {4.2: "4.2 s", 59.9: "59.9 s", 324.4: "5 min 24 s", 3599.0: "59 min 59 s", 7380.0: "2 h 03 min"}
    assert {s: format_duration(s) for s in printed} == printed
    assert all(re.fullmatch(DURATION_PATTERN, text) for text in printed.values())
    assert not re.fullmatch(DURATION_PATTERN, "5 min")

