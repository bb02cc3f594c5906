"""iREPA (Singh et al. 2025, "What matters for representation alignment"): REPA with two changes
that keep the targets' spatial structure. The projector is one 3 x 3 convolution on the token
grid instead of a token-wise MLP, and the encoder targets are normalised per image and channel
over the token positions: (y - alpha mean_T y) / std_T y, alpha 0.6 (the official LDM recipe).
Its official config also uses lambda 1.0."""

from __future__ import annotations

from dataclasses import dataclass

from vrpo.objectives.repa import REPA, REPAOptions


@dataclass
class IREPAOptions(REPAOptions):
    name: str = "irepa"
    projector: str = "conv"
    projector_kernel: int = 3
    target_norm: str = "spatial"
    target_norm_alpha: float = 0.6
    proj_coeff: float = 1.0


class IREPA(REPA):
    name = "irepa"
    Options = IREPAOptions
