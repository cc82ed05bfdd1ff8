"""What reaches the terminal: our own progress and results; Ray's and MLflow's log lines go to a file.

Ray writes from many places (its Python loggers, worker output its log monitor forwards to the
driver, C++ lines of the core worker written straight to file descriptor 2) and MLflow through
its loggers. Rather than chase each one, :func:`route_output` points the process's descriptors 1
and 2 at a log file and hands back terminal streams (duplicates of the original descriptors) for
our own consoles. Child processes inherit the redirected descriptors, so their library output
lands in the same file; give a child whose output is meant for the user the terminal streams.
``--verbose`` (``log_path=None``) leaves everything on the terminal, as before.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console


@dataclass(frozen=True)
class Terminal:
    """Where our own output goes while library output is routed to ``log_path``."""

    out: TextIO  #: results (tables, reports)
    err: TextIO  #: progress, warnings and errors of our own
    log_path: Path | None  #: None: nothing is routed (``--verbose``)

    def consoles(self) -> tuple[Console, Console]:
        """(progress console, results console) writing to the terminal streams."""
        return Console(file=self.err, highlight=False), Console(file=self.out)


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
    try:
        yield Terminal(out, err, log_path)
    finally:
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
