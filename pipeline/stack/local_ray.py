"""Start (or attach to) the Ray a job runs on: a cluster when an address is given, else a private loopback one.

A local run has no reason to be reachable from the network, yet Ray's default local start listens
on every interface: ``ray.init`` rewrites node IP 127.0.0.1 to the machine's routable address
unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and then its GCS, raylet and workers bind ``::``.
:func:`init_ray` without an address starts a new Ray (never one already running on the machine)
with node IP 127.0.0.1 and that variable set for the driver and for every process Ray spawns, so
all of them bind loopback, and with the dashboard off unless asked for (``include_dashboard=True``
or ``STAMP_RAY_DASHBOARD=1``; it then binds 127.0.0.1 too). The torch.distributed rendezvous of
the training workers is the other listener; :mod:`pipeline.training.rendezvous` keeps it on loopback.

Without the dashboard there is no state API, and Ray Train's placement-group cleaner (Ray 2.60), which asks
that API every second whether the train controller is alive, would log a warning each second of every run.
A local Ray dies with its driver, so the cleaner has nothing to clean: the workers of a dashboard-less local
Ray run :func:`quiet_cleaner_without_state_api` at start-up and only that logger's warnings are dropped.
"""

from __future__ import annotations

import logging
import os

from pipeline.stack.services import LOOPBACK

#: Ray's switch between "bind the routable IP" (1, the default on Linux) and "loopback only" (0).
LOCAL_ONLY_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: set to 1 to start the dashboard (on 127.0.0.1) with a local Ray.
DASHBOARD_VAR = "STAMP_RAY_DASHBOARD"
#: the logger of Ray Train's placement-group cleaner (tests check that Ray still names it so).
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def init_ray(address: str | None = None, *, num_cpus: int | None = None, include_dashboard: bool | None = None,
             log_to_driver: bool = True) -> None:
    """Attach to ``address`` when given, else start a private Ray that listens on 127.0.0.1 only.

    Args:
        address: a Ray cluster (``ray://...``, ``host:port``); None or empty = start a local one.
        num_cpus: CPUs of the local Ray; None = the machine's. Ignored with an address.
        include_dashboard: start the dashboard of the local Ray; None = only if ``STAMP_RAY_DASHBOARD=1``.
        log_to_driver: print the workers' output in this process.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    if include_dashboard is None:
        include_dashboard = os.environ.get(DASHBOARD_VAR, "") == "1"
    _loopback_only()
    hook = f"{__name__}.{quiet_cleaner_without_state_api.__name__}"
    runtime_env = None if include_dashboard else {"worker_process_setup_hook": hook}
    ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=include_dashboard,
             dashboard_host=LOOPBACK, log_to_driver=log_to_driver, runtime_env=runtime_env)


def quiet_cleaner_without_state_api() -> None:
    """Ray worker set-up hook: keep only errors of the placement-group cleaner (see the module docstring)."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


def _loopback_only() -> None:
    # The processes Ray spawns read the variable from the environment they inherit; this process
    # read it into ray_constants when ray was first imported (maybe before this call), and Ray
    # has no public setting for it, hence the assignment to its constant.
    from ray._private import ray_constants

    os.environ[LOCAL_ONLY_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
