"""Distributed helpers that degrade to no-ops in a single process (torchrun sets the env vars)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device: str, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) for this process; initialises the process group under torchrun,
    whose collectives fail after ``timeout_s`` waiting on a rank that died or hung (never a hang)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def close_distributed() -> None:
    """At a command's end: every rank reaches it (within the group's timeout), then the process group is
    torn down explicitly. Left to the interpreter's exit, gloo's teardown can abort a rank (SIGABRT)
    whose peers are still writing."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when the flag is set on any rank (all ranks then take the same branch)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(value):
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_mapping(mine: dict, everywhere: bool = False) -> dict | None:
    """The union over ranks of every rank's ``{key: value}`` on rank 0 (on every rank with
    ``everywhere``); None on the others."""
    if not dist.is_initialized():
        return dict(mine)
    if everywhere:
        parts: list | None = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    else:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
    return None if parts is None else {key: value for part in parts for key, value in part.items()}


def gather_arrays(mine: dict) -> dict | None:
    """Every rank's ``{group: {name: array [n_r, ...]}}`` concatenated on rank 0 in rank order (a rank
    with nothing sends {} for a group); None on the other ranks."""
    parts = gather_mapping({rank_and_world()[0]: mine})
    if parts is None:
        return None
    import numpy as np

    ordered = [parts[rank] for rank in sorted(parts)]
    return {
        group: {name: np.concatenate([p[group][name] for p in ordered if p[group]]) for name in mine[group]}
        for group in mine
    }
