"""Interpolants x_t = alpha(t) x + sigma(t) eps (t = 0 data, t = 1 noise) and prediction targets."""

from __future__ import annotations

import math

import torch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class Interpolant:
    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor, like: torch.Tensor):
        return tuple(_bcast(f(t), like) for f in (self.alpha, self.sigma, self.d_alpha, self.d_sigma))

    def sample(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s, _, _ = self.coefficients(t, x0)
        return a * x0 + s * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, _, da, ds = self.coefficients(t, x0)
        return da * x0 + ds * eps

    def target(self, prediction: str, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses for each prediction type."""
        if prediction == "velocity":
            return self.velocity(x0, eps, t)
        if prediction == "noise":
            return eps
        if prediction == "score":
            _, s, _, _ = self.coefficients(t, x0)
            return -eps / s
        raise ValueError(f"unknown prediction type {prediction!r} (velocity, noise, score)")

    def to_velocity(self, prediction: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a network output of any prediction type to the probability-flow velocity."""
        if prediction == "velocity":
            return output
        a, s, da, ds = self.coefficients(t, x_t)
        eps = output if prediction == "noise" else -output * s
        # x0 = (x_t - s eps) / a, so v = da x0 + ds eps = (da/a) x_t + (ds - da s / a) eps.
        return (da / a) * x_t + (ds - da * s / a) * eps

    def velocity_to_noise(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Invert v = da x0 + ds eps with x_t = a x0 + s eps: eps = (a v - da x_t) / (a ds - da s)."""
        a, s, da, ds = self.coefficients(t, x_t)
        return (a * v - da * x_t) / (a * ds - da * s)

    def score(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, s, _, _ = self.coefficients(t, x_t)
        return -self.velocity_to_noise(v, x_t, t) / s


class LinearInterpolant(Interpolant):
    """Rectified flow / SiT 'Linear': alpha = 1 - t, sigma = t, velocity target eps - x."""

    name = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)


class CosineInterpolant(Interpolant):
    """SiT 'GVP': alpha = cos(pi t / 2), sigma = sin(pi t / 2) (variance preserving)."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.sin(t * math.pi / 2)

    def d_alpha(self, t):
        return -math.pi / 2 * torch.sin(t * math.pi / 2)

    def d_sigma(self, t):
        return math.pi / 2 * torch.cos(t * math.pi / 2)


INTERPOLANTS = {"linear": LinearInterpolant, "cosine": CosineInterpolant}


def build_interpolant(name: str) -> Interpolant:
    if name not in INTERPOLANTS:
        raise ValueError(f"unknown interpolant {name!r} ({', '.join(INTERPOLANTS)})")
    return INTERPOLANTS[name]()


def sample_timesteps(
    n: int,
    generator: torch.Generator,
    kind: str = "uniform",
    t_min: float = 0.0,
    t_max: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Training times in [t_min, t_max]: uniform, or logit-normal (sigmoid of N(mean, std))."""
    if kind == "uniform":
        u = torch.rand(n, generator=generator)
    elif kind == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {kind!r} (uniform, logit_normal)")
    return t_min + (t_max - t_min) * u
