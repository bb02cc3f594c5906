"""REPA (Yu et al. 2025): SiT plus lambda x the negative patch-wise cosine between the
projected hidden states of block d and a frozen encoder's tokens."""

from __future__ import annotations

from dataclasses import dataclass

from vrpo.objectives.alignment import AlignmentOptions, AlignmentTargets
from vrpo.objectives.base import LossOutput
from vrpo.objectives.sit import SiT


@dataclass
class REPAOptions(AlignmentOptions):
    name: str = "repa"
    proj_coeff: float = 0.5  # lambda


class REPA(SiT):
    name = "repa"
    Options = REPAOptions

    def __init__(self, options, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        self.align = AlignmentTargets(options, cfg, model, data)

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.align.depth,)

    def loss(self, model, batch, generator) -> LossOutput:
        step = self.denoise(model, batch, generator)
        targets = self.align.targets(batch)
        similarity = self.align.cosine(self.align.project(step.hidden[self.align.depth]), targets)
        denoise, align = step.per_sample_loss.mean(), -similarity.mean()
        loss = denoise + self.options.proj_coeff * align
        return LossOutput(loss, {"loss_denoise": denoise.detach(), "loss_align": align.detach()})
