"""Transport: interpolants, timestep sampling, prediction targets, samplers and guidance.

``generate`` is the one sampling entry point shared by training-time grids, ``vrpo sample``
and evaluation, so every method is sampled the same way.
"""

from __future__ import annotations

import torch

from vrpo.transport.interpolants import (
    CosineInterpolant,
    Interpolant,
    LinearInterpolant,
    build_interpolant,
    sample_timesteps,
)
from vrpo.transport.samplers import GuidedPrediction, sample_flow, time_grid


@torch.no_grad()
def generate(model, cfg, labels: torch.Tensor | None, noise: torch.Tensor, generator: torch.Generator, **overrides) -> torch.Tensor:
    """Samples in model space from ``noise`` with the config's sampler (fields of ``cfg.sampler`` overridable)."""
    s = {**cfg.sampler.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    if s["method"] == "ddpm":
        from vrpo.transport.ddpm import create_ddpm

        diffusion = create_ddpm(respacing=s["steps"], num_steps=cfg.diffusion.num_steps)
        guided = GuidedPrediction(model, labels, None, cfg_scale=s["cfg_scale"], interval=tuple(s["cfg_interval"]), time_scale=float(cfg.diffusion.num_steps))
        # GuidedPrediction takes interpolant-style t in [0, 1]; DDPM hands original indices.
        return diffusion.p_sample_loop(lambda x, t: guided.raw(x, t / cfg.diffusion.num_steps), noise.shape, noise=noise, generator=generator)
    guided = GuidedPrediction(
        model, labels, build_interpolant(cfg.transport.interpolant), cfg.transport.prediction,
        s["cfg_scale"], tuple(s["cfg_interval"]), cfg.transport.time_scale,
    )
    return sample_flow(guided, noise, s["method"], s["steps"], s["t_start"], s["t_end"], generator, s["diffusion_scale"])


__all__ = [
    "CosineInterpolant", "GuidedPrediction", "Interpolant", "LinearInterpolant", "build_interpolant",
    "generate", "sample_flow", "sample_timesteps", "time_grid",
]
