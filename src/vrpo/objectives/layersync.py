"""LayerSync (Haghighi et al. 2026): the network aligns to itself. An early block's tokens are
pulled, by the patch-wise cosine, towards a later block's tokens of the same pass, which get no
gradient; no encoder, no projector. Recipe (SiT-XL/2): block 8 to block 16 of 28, weight 0.2."""

from __future__ import annotations

from dataclasses import dataclass

from vrpo.errors import ConfigError
from vrpo.models import SIZES, parse_arch
from vrpo.objectives.base import LossOutput, Objective
from vrpo.objectives.cosine import token_cosine
from vrpo.objectives.schedules import ScheduledOptions


def scaled_block(block: int, fraction: float, depth: int) -> int:
    """``block`` if set, else the published block's place in the depth (e.g. 8/28), at least 1."""
    return block or max(1, round(fraction * depth))


@dataclass
class LayerSyncOptions(ScheduledOptions):
    name: str = "layersync"
    source_block: int = 0  # the aligned block; 0: round(8/28 x depth)
    target_block: int = 0  # the stop-gradient target; 0: round(16/28 x depth)
    weight: float = 0.2

    def blocks(self, depth: int) -> tuple[int, int]:
        return scaled_block(self.source_block, 8 / 28, depth), scaled_block(self.target_block, 16 / 28, depth)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        depth = SIZES[parse_arch(cfg.model.arch)[1]][1]
        source, target = self.blocks(depth)
        if not 1 <= source < target <= depth:
            raise ConfigError(
                f"objective.source_block {source} must come before objective.target_block {target}, both in blocks "
                f"1..{depth} of {cfg.model.arch}"
            )
        if self.weight < 0.0:
            raise ConfigError(f"objective.weight must be >= 0, got {self.weight}")

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        return {"self": self.weight * self.logged_scale(record)}


class LayerSync(Objective):
    name = "layersync"
    Options = LayerSyncOptions

    def __init__(self, options: LayerSyncOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        self.source, self.target = options.blocks(model.depth)

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.source, self.target)

    def loss(self, model, batch, generator) -> LossOutput:
        step = self.denoise(model, batch, generator)
        denoise = step.per_sample_loss.mean()
        weight = self.options.weight * self.options.alignment_scale(self.step)
        # token_cosine normalises its second argument as a constant: the later block is the target only
        align = -token_cosine(step.hidden[self.source], step.hidden[self.target].detach()).mean()
        loss = denoise + weight * align if weight else denoise
        return LossOutput(loss, {**step.logs(), "loss_denoise": denoise.detach(), "loss_align": align.detach()})
