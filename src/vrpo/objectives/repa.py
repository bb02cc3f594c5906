"""REPA (Yu et al. 2025): the denoising loss plus lambda x the negative patch-wise cosine between
the projected hidden states of block d and a frozen encoder's tokens."""

from __future__ import annotations

from dataclasses import dataclass

from vrpo.objectives.alignment import AlignmentObjective, AlignmentOptions
from vrpo.objectives.base import LossOutput


@dataclass
class REPAOptions(AlignmentOptions):
    name: str = "repa"
    proj_coeff: float = 0.5  # lambda

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        return {"semantic": self.proj_coeff}  # VRPO's semantic reward is this term (-L_REPA)


class REPA(AlignmentObjective):
    name = "repa"
    Options = REPAOptions

    def loss(self, model, batch, generator) -> LossOutput:
        step = self.denoise(model, batch, generator)
        targets = self.alignment.targets(batch)
        similarity = self.alignment.cosine(self.alignment.project(step.hidden[self.alignment.depth]), targets)
        denoise, align = step.per_sample_loss.mean(), -similarity.mean()
        loss = denoise + self.options.proj_coeff * align
        return LossOutput(loss, {**step.logs(), "loss_denoise": denoise.detach(), "loss_align": align.detach()})
