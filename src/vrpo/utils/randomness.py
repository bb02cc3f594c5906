"""Keyed random draws: a generator per (seed, index), and sampling noise drawn per sample.

``SampleNoise`` gives every sample its own generator, keyed on its index, so a sample's initial
noise and every later draw (SDE and DDPM steps, REG's token) are the same in any batch size and
on any rank: N samples equal those of one process with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

NOISE_KEYINGS = ("sample", "batch")


def keyed_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator keyed on (seed, index): an epoch's order, a sample's (or a batch's) noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class SampleNoise:
    """One CPU generator per sample, keyed on (seed, the sample's index); each draw gives every sample
    the rows of its own generator."""

    def __init__(self, seed: int, indices: Iterable[int]):
        self.generators = [keyed_generator(seed, int(i)) for i in indices]

    def normal(self, shape) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"a draw of {shape[0]} rows from the noise of {len(self.generators)} samples")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators])


def sampling_noise(seed: int, start: int, n: int, keying: str = "sample") -> SampleNoise | torch.Generator:
    """The noise source of samples start..start+n-1: per sample, or (``batch``, the keying of runs
    evaluated before per-sample keying) one generator keyed on the batch's first index."""
    if keying not in NOISE_KEYINGS:
        raise ValueError(f"noise keying must be one of {', '.join(NOISE_KEYINGS)}, got {keying!r}")
    return SampleNoise(seed, range(start, start + n)) if keying == "sample" else keyed_generator(seed, start)


def normal(shape, source, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws of ``shape`` from ``source`` (a ``SampleNoise``, a torch.Generator drawn
    on its own device so that samples match across devices, or None), moved to ``device``."""
    if isinstance(source, SampleNoise):
        draws = source.normal(shape)
    else:
        draws = torch.randn(tuple(shape), generator=source, device=source.device if source is not None else device)
    return draws.to(device if device is not None else draws.device, dtype)
