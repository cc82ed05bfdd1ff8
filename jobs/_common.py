"""Shared plumbing of the job entrypoints: argument parsing, fail-fast validation, Ray start-up.

Jobs run as ``python jobs/<job>.py --config PATH [key=value ...]``, either directly or through
``ray job submit --working-dir . -- python jobs/<job>.py ...``. The config is validated (including
against the dataset catalog) before Ray is touched, so a typo fails in a second with the key
named. Exit codes: 0 success, 2 invalid configuration, 1 the job itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

# The job's working directory (the repository, or what `ray job submit --working-dir` shipped)
# must win over any installed copy, so workers and driver run the same code.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.settings import load_stack_credentials, state_dir_from_env  # noqa: E402

C = TypeVar("C")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. optim.lr=0.001 scaling.num_workers=4")
    return parser.parse_args(argv)


def init_ray() -> None:
    """Attach to RAY_ADDRESS / the stack's head when there is one, else start a local Ray on 127.0.0.1."""
    from pipeline.settings import get_settings
    from pipeline.stack import init_ray as start_or_attach

    start_or_attach(os.environ.get("RAY_ADDRESS") or get_settings().ray_address)


def run_job(
    description: str,
    model: type[C],
    runner: Callable[[C], Any],
    summarize: Callable[[Any], dict[str, Any]],
    argv: list[str] | None = None,
    prepare: Callable[[C], Any] | None = None,
    needs_ray: bool = True,
) -> int:
    """Parse, validate, (optionally) pre-check, start Ray (unless the job runs in this process), run; print a
    JSON summary last."""
    args = parse_args(description, argv)
    # Fill AWS/MLflow/Ray client variables from a running local stack before Ray is imported.
    load_stack_credentials(state_dir_from_env())
    try:
        cfg = load_config(args.config, args.overrides, model)  # type: ignore[type-var]
        if prepare is not None:
            prepare(cfg)  # catalog checks: still before any cluster work
    except ConfigError as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - e.g. the catalog's storage is unreachable: say so, briefly
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if needs_ray:
        init_ray()
    try:
        result = runner(cfg)
    except ConfigError as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - report and exit non-zero; the traceback is in the log above
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(summarize(result), default=str, sort_keys=True))
    return EXIT_OK
