"""The interface every training method implements.

An objective is an ``nn.Module``: its own trainable heads (projectors) and running
statistics (VRPO's reward EMAs) are its parameters and buffers, so they are optimised,
checkpointed and synchronised with the network. ``loss`` returns the scalar to minimise
and the numbers to log; all randomness comes from the generator it is handed, which the
loop keys on (seed, step), so runs resume exactly and methods with one seed are paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn


@dataclass
class ObjectiveOptions:
    name: str = "sit"

    def validate(self, cfg) -> None:
        """Refuse combinations with the rest of the config that cannot work (ConfigError)."""


@dataclass
class Batch:
    x: torch.Tensor  # model-space inputs, float (pixels in [-1, 1] or latents)
    labels: torch.Tensor | None  # int64 class labels, None when unconditional
    images: torch.Tensor | None  # uint8 pixels [B, C, H, W] for encoders (None for latents)
    index: torch.Tensor  # dataset indices, for feature-cache look-ups


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Objective(nn.Module):
    name: ClassVar[str]
    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions

    def __init__(self, options: ObjectiveOptions, cfg, model: nn.Module, data=None):
        super().__init__()
        self.options = options

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> LossOutput:
        raise NotImplementedError  # abstract: every objective defines its loss

    def finalize(self, run_dir) -> list:
        """Hook at the end of a run (rank 0): method-specific plots; returns the files written."""
        return []

    def end_of_step(self, step: int, applied: bool) -> None:
        """Hook after each step; ``applied`` is False when the step was skipped as non-finite."""

    def warnings(self, record: dict[str, float]) -> dict[str, str]:
        """Known failure modes seen in a logged record (averaged over the logging window):
        {key: one-line message}. The loop prints each key once per run and logs it."""
        return {}


def drop_labels(labels: torch.Tensor | None, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor | None:
    """Replace labels by the null class with probability p (classifier-free guidance training)."""
    if labels is None:
        return None
    drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on the CPU generator, so draws match on every device."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
