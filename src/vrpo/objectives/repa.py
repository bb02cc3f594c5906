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
        # VRPO's semantic reward is this term (-L_REPA)
        return {"semantic": self.proj_coeff * self.logged_scale(record)}


class REPA(AlignmentObjective):
    name = "repa"
    Options = REPAOptions

    def loss(self, model, batch, generator) -> LossOutput:
        step = self.denoise(model, batch, generator)
        denoise = step.per_sample_loss.mean()
        weight = self.options.proj_coeff * self.options.alignment_scale(self.step)
        if weight == 0.0:  # a schedule switched the alignment off: SiT's loss, no projector or encoder pass
            return LossOutput(denoise, {**step.logs(), "loss_denoise": denoise.detach(), "loss_align": 0.0})
        targets = self.alignment.targets(batch)
        similarity = self.alignment.cosine(self.alignment.project(step.hidden[self.alignment.depth]), targets)
        align = -similarity.mean()
        loss = denoise + weight * align
        return LossOutput(loss, {**step.logs(), "loss_denoise": denoise.detach(), "loss_align": align.detach()})
