"""REPA (Yu et al. 2025): the denoising loss plus lambda x the negative patch-wise cosine between
the projected hidden states of block d and a frozen encoder's tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vrpo.objectives.alignment import AlignmentObjective, AlignmentOptions
from vrpo.objectives.base import DenoisingStep, LossOutput


@dataclass
class REPAOptions(AlignmentOptions):
    name: str = "repa"
    proj_coeff: float = 0.5  # lambda

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        # VRPO's semantic reward is this term (-L_REPA)
        return {"semantic": self.proj_coeff * self.logged_scale(record)}


class REPA(AlignmentObjective):
    """The loss is ``noised_pass``'s denoising loss, plus ``extra_loss``, plus lambda x -``similarity``:
    the three places where a variant of REPA (REG) differs."""

    name = "repa"
    Options = REPAOptions

    def noised_pass(self, model, batch, generator) -> tuple[DenoisingStep, list | None]:
        """(the noised pass, the encoder outputs if it needed them already)."""
        return self.denoise(model, batch, generator), None

    def extra_loss(self, step: DenoisingStep) -> tuple[torch.Tensor | float, dict]:
        """A term beside the denoising loss and the alignment, and its logs."""
        return 0.0, {}

    def similarity(self, step: DenoisingStep, outputs: list) -> torch.Tensor:
        """Per-sample cosine [B] of the projected block-d states to the encoder targets."""
        targets = self.alignment.on_model_grid(outputs)
        return self.alignment.cosine(self.alignment.project(step.hidden[self.alignment.depth]), targets)

    def loss(self, model, batch, generator) -> LossOutput:
        step, outputs = self.noised_pass(model, batch, generator)
        denoise = step.per_sample_loss.mean()
        extra, extra_logs = self.extra_loss(step)
        logs = {**step.logs(), **extra_logs, "loss_denoise": denoise.detach()}
        weight = self.options.proj_coeff * self.options.alignment_scale(self.step)
        if weight == 0.0:  # a schedule switched the alignment off: no projector (nor encoder) pass
            return LossOutput(denoise + extra, {**logs, "loss_align": 0.0})
        align = -self.similarity(step, outputs or self.alignment.encoder_outputs(batch)).mean()
        return LossOutput(denoise + extra + weight * align, {**logs, "loss_align": align.detach()})
