"""The forward process a model family trains on, and how that family is sampled.

A family is chosen by the architecture: SiT-* models are ``flow`` (an interpolant, velocity
or noise/score targets, ODE/SDE samplers), DiT-* models ``ddpm`` (DiT's discrete diffusion,
eps with a learned variance, ancestral sampling). Objectives train through this interface
only, so any method (REPA, VRPO, ...) works on either family. Times are the family's own:
floats in [0, 1] for flow, integer indices 0..T-1 for ddpm; both run from data to noise.
"""

from __future__ import annotations

import copy
import math

import torch

from vrpo.models import parse_arch
from vrpo.transport.ddpm import create_ddpm
from vrpo.transport.interpolants import build_interpolant, sample_timesteps
from vrpo.transport.samplers import GuidedPrediction, sample_flow
from vrpo.transport.sharing import EncoderSharing, optimal_schedule, sharing_costs
from vrpo.utils.randomness import normal

FAMILY_OF_ARCH = {"SiT": "flow", "DiT": "ddpm"}
FAMILY_SAMPLERS = {"flow": ("euler", "heun", "sde"), "ddpm": ("ddpm",)}
SAMPLERS = tuple(method for methods in FAMILY_SAMPLERS.values() for method in methods)


def family_of(arch: str) -> str:
    return FAMILY_OF_ARCH[parse_arch(arch)[0]]


class Noising:
    """Interface: draw training times, noise data at them, score a prediction, sample."""

    family: str

    def draw_times(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def fixed_times(self, t: float, n: int, device) -> torch.Tensor:
        """n copies of the family's time at fraction ``t`` of the way from data (0) to noise (1)."""
        raise NotImplementedError  # abstract

    def fraction(self, t: torch.Tensor) -> torch.Tensor:
        """Times as the fraction of the way from data (0) to noise (1), float."""
        raise NotImplementedError  # abstract

    def earlier(self, t: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
        """Times ``delta`` (a fraction of the range; a float or one per sample) closer to the data,
        clamped at the data end."""
        raise NotImplementedError  # abstract

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for times ``t``."""
        raise NotImplementedError  # abstract

    def from_network(self, prediction: torch.Tensor) -> torch.Tensor:
        """The network's output in this family's convention (identity unless the network's differs)."""
        return prediction

    def loss_terms(self, prediction, x, noise, x_t, t) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-sample loss [B], its named per-sample parts) of a network output."""
        raise NotImplementedError  # abstract

    def generate(self, model, options: dict, labels, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Samples from ``noise`` with the sampler fields ``options`` (those of ``cfg.sampler``)."""
        raise NotImplementedError  # abstract


class FlowNoising(Noising):
    family = "flow"

    def __init__(self, transport):
        self.transport = transport
        self.interpolant = build_interpolant(transport.interpolant)
        self.reversed = transport.time_direction == "data_at_1"

    def draw_times(self, n, generator, device):
        tr = self.transport
        return sample_timesteps(n, generator, tr.timesteps, tr.t_min, tr.t_max, tr.logit_mean, tr.logit_std).to(device)

    def fixed_times(self, t, n, device):
        return torch.full((n,), t, device=device)

    def fraction(self, t):
        return t.float()

    def earlier(self, t, delta):
        return (t - delta).clamp_min(0)

    def add_noise(self, x, noise, t):
        return self.interpolant.sample(x, noise, t)

    def model_time(self, t):
        return (1 - t if self.reversed else t) * self.transport.time_scale

    def from_network(self, prediction):
        return -prediction if self.reversed else prediction  # SiT's velocity is data - noise

    def loss_terms(self, prediction, x, noise, x_t, t):
        target = self.interpolant.target(self.transport.prediction, x, noise, t)
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        return per_sample, {"denoise": per_sample}

    def generate(self, model, options, labels, noise, generator):
        tr = self.transport
        guided = GuidedPrediction(
            model,
            labels,
            self.interpolant,
            tr.prediction,
            options["cfg_scale"],
            tuple(options["cfg_interval"]),
            tr.time_scale,
            self.reversed,
            options["global_cfg_scale"],
            options["representation_guidance"],
        )
        # REG: the global token starts from its own noise, drawn after the image's from the same generator
        token = None
        if model.global_token_dim:
            token = normal((noise.shape[0], model.global_token_dim), generator, noise.device)
        if model.decoder_depth:  # DDT: the condition encoder's output is shared between evaluations
            guided.sharing = self.sharing(guided, options, noise, labels)
        state = self.integrate(guided, guided.pack(noise, token), options, generator)
        return guided.unpack(state)[0][:, : model.image_channels]  # ReDi's representation channels dropped

    def integrate(self, guided: GuidedPrediction, state: torch.Tensor, options: dict, generator) -> torch.Tensor:
        return sample_flow(
            guided,
            state,
            options["method"],
            options["steps"],
            options["t_start"],
            options["t_end"],
            generator,
            options["diffusion_scale"],
            options["heun_last_corrector"],
            options["guidance_at"],
            options["sde_last_from"],
        )

    def sharing(self, guided: GuidedPrediction, options: dict, noise: torch.Tensor, labels) -> EncoderSharing:
        """DDT's encoder sharing for one run: every ``encoder_sharing``-th evaluation, or as many
        recompute points placed by the dynamic programme on a template batch (8 samples, seed 0)."""
        every = options["encoder_sharing"]
        if options["encoder_schedule"] != "optimal" or every == 1:
            return EncoderSharing(every=every)
        # a fixed template (8 samples, classes 0..7, seed 0): the schedule is the same for every batch
        template = torch.Generator().manual_seed(0)
        rows = 8
        template_noise = torch.randn((rows, *noise.shape[1:]), generator=template).to(noise.device)
        probe = copy.copy(guided)
        classes = guided.model.num_classes
        probe.labels = None if labels is None else (torch.arange(rows) % max(classes, 1)).to(labels.device)
        probe.sharing = EncoderSharing(record=True)
        self.integrate(probe, template_noise, options, template)
        evaluations = len(probe.sharing.history)
        points = optimal_schedule(sharing_costs(probe.sharing.history), math.ceil(evaluations / every))
        return EncoderSharing(recompute=points)


class DDPMNoising(Noising):
    family = "ddpm"

    def __init__(self, diffusion_cfg):
        self.num_steps = diffusion_cfg.num_steps
        self.diffusion = create_ddpm(num_steps=self.num_steps)

    def draw_times(self, n, generator, device):
        return torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator).to(device)

    def fixed_times(self, t, n, device):
        return torch.full((n,), round(t * (self.diffusion.num_timesteps - 1)), device=device, dtype=torch.long)

    def fraction(self, t):
        return t.float() / (self.diffusion.num_timesteps - 1)

    def earlier(self, t, delta):
        shift = torch.as_tensor(delta * self.diffusion.num_timesteps, device=t.device).round().long()
        return (t - shift).clamp_min(0)

    def add_noise(self, x, noise, t):
        return self.diffusion.q_sample(x, t, noise)

    def model_time(self, t):
        return self.diffusion.model_timesteps(t, t)

    def loss_terms(self, prediction, x, noise, x_t, t):
        terms = self.diffusion.losses_from_output(prediction, x, x_t, t, noise)
        return terms["loss"], {"mse": terms["mse"], "vb": terms["vb"]}

    def generate(self, model, options, labels, noise, generator):
        if model.global_token_dim:
            raise ValueError("a network with a global token (REG) is sampled by the flow samplers, not DDPM")
        diffusion = create_ddpm(respacing=options["steps"], num_steps=self.num_steps)
        guided = GuidedPrediction(
            model,
            labels,
            None,
            cfg_scale=options["cfg_scale"],
            interval=tuple(options["cfg_interval"]),
            time_scale=float(self.num_steps),
        )
        # GuidedPrediction takes interpolant-style t in [0, 1]; DDPM hands original indices.
        return diffusion.p_sample_loop(
            lambda x, t: guided.raw(x, t / self.num_steps), noise.shape, noise=noise, generator=generator
        )


def build_noising(cfg) -> Noising:
    """The forward process of the config's model family."""
    if family_of(cfg.model.arch) == "ddpm":
        return DDPMNoising(cfg.diffusion)
    return FlowNoising(cfg.transport)
