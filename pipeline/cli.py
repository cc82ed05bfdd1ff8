"""Moved to :mod:`pipeline.apps.cli`; this shim goes in the next release.

Console scripts installed before the move (``stamp = "pipeline.cli:app"``) and
``python -m pipeline.cli`` still work through it; reinstall (``make venv``) to get the new entry point.
"""

import sys
import warnings

from pipeline.apps.cli import app, main

warnings.warn(
    "pipeline.cli moved to pipeline.apps.cli; the old path goes in the next release "
    "(reinstall with `make venv` if your `stamp` script still names it)",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["app", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
