"""Transport: interpolants, timestep sampling, prediction targets, samplers and guidance.

``generate`` is the one sampling entry point shared by training-time grids, ``vrpo sample``
and evaluation, so every method is sampled the same way; the model family's ``Noising``
(``vrpo.transport.noising``) decides the process and its sampler.
"""

from __future__ import annotations

import torch

from vrpo.errors import ConfigError
from vrpo.transport.interpolants import (
    CosineInterpolant,
    Interpolant,
    LinearInterpolant,
    build_interpolant,
    sample_timesteps,
)
from vrpo.transport.noising import FAMILY_SAMPLERS, DDPMNoising, FlowNoising, Noising, build_noising, family_of
from vrpo.transport.samplers import GuidedPrediction, sample_flow, time_grid


@torch.no_grad()
def generate(model, cfg, labels, noise: torch.Tensor, generator: torch.Generator, **overrides) -> torch.Tensor:
    """Samples in model space from ``noise`` with the config's sampler (fields of ``cfg.sampler`` overridable)."""
    options = {**cfg.sampler.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    noising = build_noising(cfg)
    if options["method"] not in FAMILY_SAMPLERS[noising.family]:
        raise ConfigError(f"sampler {options['method']!r} does not sample the {noising.family} family of "
                          f"{cfg.model.arch}: use {' or '.join(FAMILY_SAMPLERS[noising.family])}")  # fmt: skip
    return noising.generate(model, options, labels, noise, generator)


__all__ = [
    "CosineInterpolant",
    "DDPMNoising",
    "FlowNoising",
    "GuidedPrediction",
    "Interpolant",
    "LinearInterpolant",
    "Noising",
    "build_interpolant",
    "build_noising",
    "family_of",
    "generate",
    "sample_flow",
    "sample_timesteps",
    "time_grid",
]
