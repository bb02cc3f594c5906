"""REG (Wu et al. 2025, "Representation Entanglement for Generation"): REPA plus the encoder's
global (CLS) token, noised with the image's interpolant and t, entered in front of the patch
tokens; the network denoises both, and the token's velocity loss has its own weight (0.03 as
published). At sampling the token is generated jointly with the image from its own noise, and
classifier-free guidance covers it (``sampler.global_cfg_scale``). The network variant is
``model.global_token_dim``, set to the encoder's global width. Recipe (SiT-XL/2): DINOv2-B, block 8,
lambda 0.5. The official code also aligns the token's block-d state to the CLS token
(``align_global: true``); by default the alignment is on the patches, as REPA's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vrpo.encoders import global_width
from vrpo.errors import ConfigError
from vrpo.objectives.base import DenoisingStep
from vrpo.objectives.cosine import token_cosine
from vrpo.objectives.repa import REPA, REPAOptions


def global_token_defaults(encoders: list[str]) -> dict:
    """The model option a method with REG's token needs: the width of its encoder's global vector."""
    try:
        return {"global_token_dim": global_width(encoders[0])} if encoders else {}
    except ValueError as err:
        raise ConfigError(f"objective.encoders: {err}") from None


def check_global_token(cfg, encoders: list[str], weight: float) -> None:
    """Refuse what cannot carry REG's token: several encoders, a network of another width, DDPM."""
    if len(encoders) != 1:
        raise ConfigError(f"REG's global token comes from one encoder, objective.encoders has {len(encoders)}")
    width = global_width(encoders[0])
    if cfg.model.global_token_dim != width:
        raise ConfigError(
            f"REG's token is {encoders[0]}'s global vector: model.global_token_dim must be its width {width}, got "
            f"{cfg.model.global_token_dim}"
        )
    if weight < 0.0:
        raise ConfigError(f"objective.global_weight must be >= 0, got {weight}")


def check_encoder_width(model, encoder) -> None:
    """The built encoder against the network's token width (a DINOv2 from other weights may differ)."""
    if model.global_token_dim != encoder.global_dim:
        raise ConfigError(
            f"model.global_token_dim is {model.global_token_dim}, but {encoder.name}'s global token has width "
            f"{encoder.global_dim}: set model.global_token_dim={encoder.global_dim}"
        )


@dataclass
class REGOptions(REPAOptions):
    name: str = "reg"
    families: ClassVar[tuple[str, ...]] = ("flow",)
    global_weight: float = 0.03  # on the global token's denoising loss
    align_global: bool = False  # also align the token's block-d state to the encoder's global vector

    def validate(self, cfg) -> None:
        super().validate(cfg)
        check_global_token(cfg, self.encoders, self.global_weight)
        if self.align_global and (self.projector != "mlp" or self.token_grid != "resample_targets"):
            raise ConfigError("objective.align_global needs objective.projector=mlp and token_grid=resample_targets")

    def model_defaults(self, arch: str) -> dict:
        return global_token_defaults(self.encoders)

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        return {**super().alignment_coefficients(record), "global_token": self.global_weight}


class REG(REPA):
    name = "reg"
    Options = REGOptions

    def __init__(self, options: REGOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        encoder = self.alignment.encoders[0]
        check_encoder_width(model, encoder)
        if options.align_global and encoder.global_dim != encoder.token_dim:
            raise ConfigError(f"objective.align_global: {encoder.name}'s global and patch widths differ")

    def noised_pass(self, model, batch, generator) -> tuple[DenoisingStep, list]:
        outputs = self.alignment.encoder_outputs(batch)  # the clean global token enters the pass
        return self.denoise(model, batch, generator, global_token=outputs[0][1]), outputs

    def extra_loss(self, step: DenoisingStep) -> tuple[torch.Tensor, dict]:
        return self.options.global_weight * step.global_loss.mean(), {}  # step.logs() has loss_global

    def similarity(self, step: DenoisingStep, outputs: list) -> torch.Tensor:
        patches = super().similarity(step, outputs)
        if not self.options.align_global:
            return patches
        # the token as one more position of the mean, as the official code's sequence-wide cosine
        state = step.hidden_global[self.alignment.depth][:, None]
        token = token_cosine(self.alignment.project(state)[0], outputs[0][1][:, None])[:, 0]
        n = step.hidden[self.alignment.depth].shape[1]
        return (patches * n + token) / (n + 1)
