"""The torch.distributed process group of Ray Train workers, bound to loopback when their node is.

Ray's ``TorchConfig`` rendezvous (``env://``) makes rank 0 host a ``TCPStore``, and a TCPStore
server listens on every interface (``::``) whatever ``MASTER_ADDR`` says; gloo then listens on the
address the host name resolves to. On a node whose IP is 127.0.0.1 (a local Ray, see
:func:`pipeline.stack.init_ray`; the stack's head) every worker runs on this machine, so
:class:`LoopbackTorchConfig` has rank 0 listen on a socket it bound to 127.0.0.1 itself (handed to
the TCPStore as ``master_listen_fd``) and points gloo at the loopback interface. On any other node,
or with NCCL (GPUs: its bootstrap has its own interface settings), Ray's own setup runs unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psutil
import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

# Ray 2.60 (pinned): the backend to extend, the env vars its setup gives every worker, and the
# old-API worker group that must not get them; none of them has a public name.
from ray.train._internal.worker_group import WorkerGroup as _V1WorkerGroup
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"

#: the listening socket rank 0 bound, kept (by file descriptor) until the TCPStore takes it over.
_listener_fd: int | None = None


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_interface() -> str:
    """Name of the network interface that holds 127.0.0.1 (``lo`` on Linux); gloo binds by name."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    raise RuntimeError(f"no network interface holds {LOOPBACK}: cannot keep the process group on loopback")


def _listen_on_loopback() -> int:
    """Rank 0: bind and listen on 127.0.0.1 (a free port); return the port."""
    global _listener_fd
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    port = sock.getsockname()[1]
    _listener_fd = sock.detach()  # the TCPStore owns the descriptor from here on
    return port


def _join_loopback_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """Every rank: the TCPStore on 127.0.0.1:``port`` (rank 0 serves it), then the process group."""
    os.environ.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": loopback_interface()})
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(LOOPBACK, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=_listener_fd, wait_for_workers=False)
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: "LoopbackTorchConfig") -> None:
        backend = backend_config.backend or "gloo"
        if backend != "gloo" or not _is_loopback(worker_group.execute_single(0, _node_ip)):
            super().on_start(worker_group, backend_config)
            return
        port = worker_group.execute_single(0, _listen_on_loopback)
        if not isinstance(worker_group, _V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _join_loopback_group, backend=backend, world_rank=rank,
                                                   world_size=len(worker_group), port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray's ``TorchConfig`` whose gloo process group listens on 127.0.0.1 when the workers' node IP is loopback."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend
