"""Dispersive loss (Wang & He 2025): an InfoNCE without positive pairs. A block's hidden states
of the samples in the (per-rank) batch repel each other:
L_disp = log mean_{i,j} exp(-D(z_i, z_j) / tau), D the squared L2 distance of the flattened
states divided by their size, every pair i, j of the B x B matrix (i = j included). No encoder,
no projector. The paper's setting: weight 0.5, tau 0.5, block depth // 4."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vrpo.errors import ConfigError
from vrpo.models import SIZES, parse_arch
from vrpo.objectives.base import LossOutput, Objective
from vrpo.objectives.schedules import ScheduledOptions


def dispersive_loss(hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of the mean over all B^2 pairs of exp(-||z_i - z_j||^2 / (dim tau)), z the flattened rows."""
    z = hidden.flatten(1).float()
    squared = (z * z).sum(1)
    # the Gram form has a smooth gradient at i = j, where a norm (cdist) has none
    distance = (squared[:, None] + squared[None, :] - 2.0 * z @ z.T).clamp_min(0.0) / z.shape[1]
    return torch.logsumexp(-distance.flatten() / temperature, 0) - math.log(distance.numel())


@dataclass
class DispersiveOptions(ScheduledOptions):
    name: str = "dispersive"
    block: int = 0  # the block whose output disperses; 0: depth // 4 (the paper's)
    weight: float = 0.5
    temperature: float = 0.5

    def block_of(self, depth: int) -> int:
        return self.block or max(1, depth // 4)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        depth = SIZES[parse_arch(cfg.model.arch)[1]][1]
        if not 1 <= self.block_of(depth) <= depth:
            raise ConfigError(f"objective.block {self.block} is outside blocks 1..{depth} of {cfg.model.arch}")
        if self.weight < 0.0 or self.temperature <= 0.0:
            raise ConfigError("objective.weight must be >= 0 and objective.temperature > 0")

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        return {"dispersion": self.weight * self.logged_scale(record)}


class Dispersive(Objective):
    name = "dispersive"
    Options = DispersiveOptions

    def __init__(self, options: DispersiveOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        self.block = options.block_of(model.depth)

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.block,)

    def loss(self, model, batch, generator) -> LossOutput:
        step = self.denoise(model, batch, generator)
        denoise = step.per_sample_loss.mean()
        weight = self.options.weight * self.options.alignment_scale(self.step)
        disperse = dispersive_loss(step.hidden[self.block], self.options.temperature)
        loss = denoise + weight * disperse if weight else denoise
        return LossOutput(loss, {**step.logs(), "loss_denoise": denoise.detach(), "loss_disperse": disperse.detach()})
