"""Collectives of the training loops: gradient all-reduce, weight broadcast, metrics averaged over ranks.

Every function is a no-op question or a single collective over the default process group that
Ray Train sets up (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.training.context import WorkerContext
from stamp_core import StampPruner


def is_distributed(ctx: WorkerContext) -> bool:
    """Whether ``ctx`` has peers and a process group to reach them."""
    return ctx.world_size > 1 and dist.is_available() and dist.is_initialized()


def allreduce_grads(pruner: StampPruner, world_size: int) -> None:
    """Average gradients over ranks in one collective; keep ``grad=None`` where no rank has one."""
    params = [p for p in pruner.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [flags])
    dist.all_reduce(flat)
    offset = 0
    total_flags = flat[-len(params):]
    for i, p in enumerate(params):
        n = p.numel()
        if total_flags[i] > 0:
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) / world_size
        else:
            p.grad = None
        offset += n


def average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average every floating-point buffer over ranks in one collective (counters are left alone).

    Buffers are not gradients: each rank updates its own from its own episodes (the task-norm
    running statistics of the mask generator), and without this the ranks of one run would
    checkpoint from rank 0 but keep generating with drifting statistics.
    """
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b).to(b.dtype))
        offset += b.numel()


def broadcast_state(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (and BatchNorm statistics)."""
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)


def mean_over_ranks(values: dict[str, float], ctx: WorkerContext, device: torch.device,
                     sums: tuple[str, ...] = (), maxes: tuple[str, ...] = ()) -> dict[str, float]:
    """Average (or sum / max, for the named keys) scalar metrics over ranks."""
    if not is_distributed(ctx):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    mx = torch.tensor([values[k] for k in maxes], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if len(maxes):
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    out = {k: float(v) / (1 if k in sums else ctx.world_size) for k, v in zip(keys, t.tolist())}
    out.update({k: float(v) for k, v in zip(maxes, mx.tolist())})
    return out
