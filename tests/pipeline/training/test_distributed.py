"""Tests for pipeline.training.distributed: the gradient all-reduce over two real gloo processes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.training import allreduce_grads, average_buffers
from stamp_core import StampPruner


def _allreduce_child(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        pruner = StampPruner.create("small_cnn", backbone_kwargs={"width": 4}, embed_dim=8, num_heads=2,
                                    num_inducing=2, hidden_dim=8)
        params = [p for p in pruner.parameters() if p.requires_grad]
        for i, p in enumerate(params):
            if i == 0:
                p.grad = None  # no rank has a gradient: must stay None
            elif i == 1:
                p.grad = torch.full_like(p, 4.0) if rank == 0 else None  # only rank 0 has one
            else:
                p.grad = torch.full_like(p, float(rank + 1))
        allreduce_grads(pruner, world_size)
        summary = [None if p.grad is None else float(p.grad.flatten()[0]) for p in params[:3]]
        Path(out_dir, f"{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_allreduce_grads_averages_and_keeps_missing_gradients_none(tmp_path: Path) -> None:
    init_file = tmp_path / "pg-init"
    mp.spawn(_allreduce_child, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] == [None, 2.0, 1.5]


def _buffers_child(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        pruner = StampPruner.create("small_cnn", backbone_kwargs={"width": 4}, embed_dim=8, num_heads=2,
                                    num_inducing=2, hidden_dim=8)
        std = pruner.generator.embed_std
        std.running_mean.fill_(float(rank))  # each rank saw other tasks
        std.num_batches.fill_(7)
        average_buffers(pruner, world_size)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(
            {"mean": std.running_mean.tolist(), "count": int(std.num_batches),
             "buffers": {k: v.double().sum().item() for k, v in pruner.named_buffers()}}))
    finally:
        dist.destroy_process_group()


def test_average_buffers_leaves_every_rank_with_the_same_statistics(tmp_path: Path) -> None:
    init_file = tmp_path / "pg-init"
    mp.spawn(_buffers_child, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["mean"] == [0.5] * 8 and results[0]["count"] == 7
