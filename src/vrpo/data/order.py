"""Deterministic, step-keyed data order: the batch of a step depends only on (seed, step).

Each epoch is a fresh permutation seeded by (seed, epoch); a global batch may straddle two
epochs. Resuming at step s therefore needs no sampler state, and every method trained with
the same seed sees the same images in the same order (paired comparisons).
"""

from __future__ import annotations

import torch

from vrpo.utils.randomness import keyed_generator


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=keyed_generator(seed, epoch))


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of ``step`` (0-based)."""
    start = step * global_batch
    out, filled = [], 0
    while filled < global_batch:
        epoch, offset = divmod(start + filled, n)
        take = min(global_batch - filled, n - offset)
        out.append(_epoch_permutation(n, seed, epoch)[offset : offset + take])
        filled += take
    return torch.cat(out)


def data_position(step: int, global_batch: int, n: int) -> dict:
    epoch, offset = divmod(step * global_batch, n)
    return {"epoch": epoch, "offset": offset, "images_seen": step * global_batch}


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """The CPU generator for all randomness of one micro-batch (timesteps, noise, label dropout)."""
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + micro * 0xC2B2AE3D + rank * 0x27D4EB2F) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)
