"""`ray start` for a worker node of a loopback-only Ray cluster on one machine (a script, run by path).

The stack keeps every Ray process on 127.0.0.1 with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``:
with the switch at 1 Ray rewrites ``127.0.0.1`` to the machine's routable IP (and a GCS bound
to loopback is then unreachable). But `ray start --address=...` refuses to join a cluster while
the switch is 0 (a guard meant for Windows/OSX laptops). This wrapper lifts only that guard, in
the CLI module alone; address resolution, the raylet and every process it starts still see the
switch at 0 and stay on loopback. Usage: ``python ray_worker_start.py start --address=... ...``.
"""

from __future__ import annotations

import sys
import types

from ray._private import ray_constants
from ray.scripts import scripts


class _JoinAllowed(types.ModuleType):
    """``ray_constants`` as the CLI sees it: the same values, but multi-node start allowed."""

    ENABLE_RAY_CLUSTER = True

    def __getattr__(self, name: str) -> object:
        return getattr(ray_constants, name)


if __name__ == "__main__":
    scripts.ray_constants = _JoinAllowed("ray_constants")  # type: ignore[assignment]
    sys.argv[0] = "ray"
    sys.exit(scripts.main())
