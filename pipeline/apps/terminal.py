"""What reaches the terminal: our own progress and results; Ray's and MLflow's log lines go to a file.

Ray writes from many places (its Python loggers, worker output its log monitor forwards to the
driver, C++ lines of the core worker written straight to file descriptor 2) and MLflow through
its loggers. Rather than chase each one, :func:`route_output` points the process's descriptors 1
and 2 at a log file and hands back terminal streams (duplicates of the original descriptors) for
our own consoles. Child processes inherit the redirected descriptors, so their library output
lands in the same file; give a child whose output is meant for the user the terminal streams.
Warnings and errors of our own loggers (``pipeline.*``, e.g. "MLflow logging skipped ... (training
continues)") are shown on the terminal as ``warning: ...`` lines as well. ``--verbose``
(``log_path=None``) leaves everything on the terminal, as before.

:func:`stage_progress` is the one progress renderer of the CLI: one line per stage with the
done/total count, elapsed time, ETA and the stage's key figure (loss, accuracy, images/s). On a
terminal the line is redrawn in place; elsewhere (a pipe, a CI log) only its final state is
printed, so a stage is one line whatever its length.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclass(frozen=True)
class Terminal:
    """Where our own output goes while library output is routed to ``log_path``."""

    out: TextIO  #: results (tables, reports)
    err: TextIO  #: progress, warnings and errors of our own
    log_path: Path | None  #: None: nothing is routed (``--verbose``)

    def consoles(self) -> tuple[Console, Console]:
        """(progress console, results console) writing to the terminal streams."""
        return Console(file=self.err, highlight=False), Console(file=self.out)


class _PlainWarning(logging.Formatter):
    """``warning: MESSAGE`` / ``error: MESSAGE``: no logger names or timestamps on the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@contextmanager
def route_output(log_path: Path | None) -> Iterator[Terminal]:
    """Send everything written to descriptors 1 and 2 to ``log_path`` until the block ends.

    Yields the terminal streams for our own output. The file is opened for appending with mode
    0600 (library log lines may quote endpoints). With ``log_path=None`` nothing is redirected.
    """
    if log_path is None:
        yield Terminal(sys.stdout, sys.stderr, None)
        return
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    ours = logging.StreamHandler(err)
    ours.setLevel(logging.WARNING)
    ours.setFormatter(_PlainWarning())
    logging.getLogger("pipeline").addHandler(ours)
    try:
        yield Terminal(out, err, log_path)
    finally:
        logging.getLogger("pipeline").removeHandler(ours)
        for stream in (sys.stdout, sys.stderr, out, err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken stream must not hide the block's own error
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd_saved in saved:
            os.close(fd_saved)
        out.close()
        err.close()


class StageProgress:
    """The live line of one stage; :meth:`update` may be called from any thread."""

    def __init__(self, progress: Progress, task: TaskID, unit: str) -> None:
        self._progress = progress
        self._task = task
        self._unit = unit
        self._lock = threading.Lock()
        self.done: float = 0.0
        self.total: float | None = progress.tasks[0].total
        self.figure = ""
        self.updates = 0  #: how many updates arrived (the tests read it)

    def update(self, done: float | None = None, figure: str | None = None, total: float | None = None) -> None:
        """Move the line to ``done`` of the total and show ``figure`` (e.g. "loss 0.41 · 812 img/s")."""
        with self._lock:
            if total is not None:
                self.total = total
            if done is not None:
                self.done = min(done, self.total) if self.total else done
            if figure is not None:
                self.figure = figure
            self.updates += 1
            self._progress.update(self._task, completed=self.done, total=self.total, figure=self.figure)

    def summary(self, seconds: float) -> str:
        """The final line: count, time and the last key figure."""
        count = ""
        if self.total:
            count = f" {_count(self.done)}/{_count(self.total)} {self._unit}".rstrip()
        figure = f" · {self.figure}" if self.figure else ""
        return f"{count} in {format_duration(seconds)}{figure}"


def _count(v: float) -> str:
    return f"{v:g}" if v != int(v) else str(int(v))


# What `format_duration` prints, for tests and log readers that parse a stage line: "4.2 s", "5 min 24 s", "2 h 03 min".
DURATION_PATTERN = r"(?:\d+\.\d s|\d+ min \d\d s|\d+ h \d\d min)"


def format_duration(seconds: float) -> str:
    """A stage's wall time as the progress line shows it (matches DURATION_PATTERN)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@contextmanager
def stage_progress(console: Console, title: str, total: float | None = None, unit: str = "") -> Iterator[StageProgress]:
    """One stage's progress line on ``console``; on exit it is replaced by one final line.

    Args:
        console: where the line goes (the terminal's progress stream).
        title: the stage, e.g. "pretrain".
        total: units of work (epochs, steps, trials x steps); None: elapsed time only.
        unit: what is counted, e.g. "epochs".

    The final line reads ``ok TITLE N/N UNIT in 12.3 s · FIGURE`` or, when the block raises,
    ``failed TITLE after 12.3 s``; the exception propagates.
    """
    columns = [TextColumn("[bold]{task.description}")]
    if total is not None:
        columns += [BarColumn(bar_width=24), TextColumn("{task.completed:g}/{task.total:g} " + unit)]
    columns += [TimeElapsedColumn()]
    if total is not None:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    columns += [TextColumn("{task.fields[figure]}")]
    # transient: on a terminal the live line disappears and our own final line takes its place;
    # elsewhere no live line is drawn at all (rich would print its last frame and a blank line).
    # redirect_*=False: rich would otherwise swap sys.stdout/sys.stderr for proxies that print
    # onto the console above the live line, which would bring library output (Ray's forwarded
    # worker lines are print()s) back to the terminal that route_output took it off.
    progress = Progress(*columns, console=console, transient=True, refresh_per_second=4,
                        disable=not console.is_terminal, redirect_stdout=False, redirect_stderr=False)
    task = progress.add_task(title, total=total, figure="")
    line = StageProgress(progress, task, unit)
    t0 = time.perf_counter()
    progress.start()
    try:
        yield line
    except BaseException:
        progress.stop()
        console.print(f"[bold red]failed[/] {title} after {format_duration(time.perf_counter() - t0)}", highlight=False, soft_wrap=True)
        raise
    progress.stop()
    console.print(f"[green]ok[/] [bold]{title}[/]{line.summary(time.perf_counter() - t0)}", highlight=False, soft_wrap=True)
