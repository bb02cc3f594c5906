"""REPA (Yu et al. 2025): the denoising loss plus lambda x the negative patch-wise cosine between
the projected hidden states of block d and a frozen encoder's tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vrpo.errors import ConfigError
from vrpo.models import SIZES, parse_arch
from vrpo.objectives.alignment import AlignmentObjective, AlignmentOptions
from vrpo.objectives.base import DenoisingStep, LossOutput


@dataclass
class REPAOptions(AlignmentOptions):
    name: str = "repa"
    proj_coeff: float = 0.5  # lambda
    # HASTE's attention term: the softmax of these blocks' attention (their first attention_heads heads)
    # pulled by cross-entropy towards the encoder's (a ViT's) blocks' attention; 0.5 published, 0: off
    attention_weight: float = 0.0
    attention_blocks: list[int] = field(default_factory=lambda: [5, 6, 7, 8])
    encoder_attention_blocks: list[int] = field(default_factory=lambda: [9, 10, 11, 12])
    attention_heads: int = 12

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if not self.attention_weight:
            return
        _, size, _ = parse_arch(cfg.model.arch)
        _, depth, heads = SIZES[size]
        if len(self.attention_blocks) != len(self.encoder_attention_blocks) or not self.attention_blocks:
            raise ConfigError("objective.attention_blocks and encoder_attention_blocks must pair up one to one")
        if not all(1 <= b <= depth for b in self.attention_blocks) or not 1 <= self.attention_heads <= heads:
            raise ConfigError(
                f"objective.attention_blocks must lie in 1..{depth} and attention_heads in 1..{heads} for "
                f"{cfg.model.arch}, got {self.attention_blocks} and {self.attention_heads}"
            )
        if self.attention_weight < 0.0:
            raise ConfigError(f"objective.attention_weight must be >= 0, got {self.attention_weight}")

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        # VRPO's semantic reward is this term (-L_REPA)
        scale = self.logged_scale(record)
        attention = {"attention": self.attention_weight * scale} if self.attention_weight else {}
        return {"semantic": self.proj_coeff * scale, **attention}


class REPA(AlignmentObjective):
    """The loss is ``noised_pass``'s denoising loss, plus ``extra_loss``, plus lambda x -``similarity``:
    the three places where a variant of REPA (REG) differs."""

    name = "repa"
    Options = REPAOptions

    def __init__(self, options: REPAOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        if options.attention_weight:
            encoder = self.alignment.encoders[0]
            if not encoder.exposes_attention:
                raise ConfigError(f"objective.attention_weight: {encoder.name} exposes no attention maps (use DINOv2)")
            if self.alignment.encoder_grids[0] != self.alignment.model_grid:
                raise ConfigError(
                    f"objective.attention_weight: {encoder.name}'s {self.alignment.encoder_grids[0]} token grid must "
                    f"equal the model's {self.alignment.model_grid} to compare attention maps"
                )

    def attention_layers(self) -> tuple[int, ...]:
        return tuple(self.options.attention_blocks) if self.options.attention_weight else ()

    def attention_loss(self, step: DenoisingStep, batch) -> torch.Tensor:
        """HASTE's term: cross-entropy of the model's attention rows against the encoder's, averaged over
        the block pairs (the encoder runs on the images: attention maps are not cached)."""
        o = self.options
        if batch.images is None:
            raise RuntimeError("HASTE's attention term reads the encoder's attention: it needs pixel images")
        targets = self.alignment.encoders[0].attention_maps(batch.images, o.encoder_attention_blocks)
        total = 0.0
        for mine, theirs in zip(o.attention_blocks, o.encoder_attention_blocks):
            logits = step.output.attention[mine][:, : o.attention_heads].float()
            target = targets[theirs].float().softmax(-1)
            total = total + -(target * logits.log_softmax(-1)).sum(-1).mean()
        return total / len(o.attention_blocks)

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
        scale = self.options.alignment_scale(self.step)
        weight = self.options.proj_coeff * scale
        if weight == 0.0:  # a schedule switched the alignment off: no projector (nor encoder) pass
            return LossOutput(denoise + extra, {**logs, "loss_align": 0.0})
        align = -self.similarity(step, outputs or self.alignment.encoder_outputs(batch)).mean()
        loss = denoise + extra + weight * align
        if self.options.attention_weight:
            attention = self.attention_loss(step, batch)
            loss = loss + self.options.attention_weight * scale * attention
            logs["loss_attention"] = attention.detach()
        return LossOutput(loss, {**logs, "loss_align": align.detach()})
