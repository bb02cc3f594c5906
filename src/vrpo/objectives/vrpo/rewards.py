"""VRPO's reward components and what turns them into the two gradient paths.

Per sample i at its timestep: semantic (patch and/or global cosine to a frozen encoder),
stability (cosine to a gradient-free pass at t - delta), fidelity (Frechet distance of pooled
projections to EMA statistics of real features), optionally perceptual (-LPIPS). The policy
path turns the total R_i into advantages and positive per-sample weights.
"""

from __future__ import annotations

import contextlib
import io
from typing import NamedTuple

import torch

from vrpo.objectives.cosine import token_cosine


class Reward(NamedTuple):
    sample: torch.Tensor  # [B] per-sample value (advantages, R statistics)
    batch: torch.Tensor  # scalar the pathwise loss differentiates (and whose variance weights it)


def frechet_reward_terms(
    g: torch.Tensor, mean: torch.Tensor, second: torch.Tensor, root: torch.Tensor | None
) -> torch.Tensor:
    """Frechet distance of the rows of g [B, D] to N(mean, second): ``second`` is the
    per-dimension variance (diagonal; root None) or the covariance with its square root."""
    g = g.double()
    mu = g.mean(0)
    distance = (mu - mean).pow(2).sum()
    if root is None:
        var = g.var(0, unbiased=False)
        return distance + ((var + 1e-12).sqrt() - second.sqrt()).pow(2).sum()
    centred = g - mu
    cov = centred.T @ centred / g.shape[0]
    sandwich = root @ cov @ root
    trace_sqrt = torch.linalg.eigvalsh(0.5 * (sandwich + sandwich.T)).clamp_min(1e-12).sqrt().sum()
    return distance + cov.trace() + second.trace() - 2 * trace_sqrt


def load_lpips():
    """LPIPS(AlexNet), frozen; a one-line error when the package or its weights are missing."""
    try:
        import lpips

        with contextlib.redirect_stdout(io.StringIO()):
            net = lpips.LPIPS(net="alex", verbose=False)
    except Exception as err:  # ImportError, or a weights download refused offline
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(
            "objective.perceptual=lpips needs the lpips package and its pretrained AlexNet weights, which could "
            f"not be loaded ({reason}); "
            "install them where the weights can be fetched, or set objective.perceptual=off"
        ) from None
    return net.eval().requires_grad_(False)


def global_cosine(heads, hidden: torch.Tensor, globals_: list[torch.Tensor]) -> torch.Tensor:
    """Cosine of a head on the mean-pooled states to each encoder's global vector, averaged: [B]."""
    pooled = hidden.mean(dim=1)
    sims = [token_cosine(head(pooled), y) for head, y in zip(heads, globals_)]
    return torch.stack(sims).mean(dim=0)


def clip_fidelity(r: torch.Tensor, floor: float, mode: str) -> torch.Tensor:
    return r.clamp_min(floor) if mode == "hard" else floor * torch.tanh(r / floor)


def fidelity_reward(pooled: list[torch.Tensor], reference: list[tuple], options) -> Reward:
    """Per sample: -squared distance of its token-mean projection g [B, D] to the real mean, per
    dimension; per batch: -FD of the g to the real statistics, per dimension (both clipped)."""
    floor, mode = options.fidelity_floor, options.fidelity_clip
    samples, batches = [], []
    for g, (mean, second, root) in zip(pooled, reference):
        dim = g.shape[1]
        samples.append(clip_fidelity(-(g.double() - mean).pow(2).sum(1).float() / dim, floor, mode))
        batches.append(clip_fidelity(-frechet_reward_terms(g, mean, second, root).float() / dim, floor, mode))
    sample = torch.stack(samples).mean(0)
    batch = sample.mean() if options.fidelity_pathwise == "sample" else torch.stack(batches).mean()
    return Reward(sample, batch)


@torch.no_grad()
def perceptual_reward(
    lpips, x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor
) -> torch.Tensor:
    """-LPIPS(x0_hat, x) per sample, x0_hat = x_t - t v_theta; no gradient (advantage only)."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    x0 = (x_t - t * velocity).clamp(-1, 1).float()
    x = x.float()
    if x.shape[1] == 1:  # LPIPS reads RGB
        x0, x = x0.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
    return -lpips.to(x.device)(x0, x).flatten()


def advantages(total: torch.Tensor, m_R, v_R, options) -> torch.Tensor:
    """A_i against a baseline: the other draws of the image (groups), else (R_i - m) / sqrt(v) with
    m, v global scalars or per-sample values (the statistics of each sample's bin of t)."""
    g, total = options.group_size, total.double()  # rewards differ in late digits
    if g > 1:  # GRPO: relative to the other draws of the same image
        groups = total.view(-1, g)
        return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).flatten().float()
    if options.normalize:
        return ((total - m_R) / v_R.sqrt()).float()
    return total.float()  # a_i is normalised to mean 1, so a shift would change nothing but the clip


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two vectors (0 when either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return ((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)).float()


def policy_weights(advantage: torch.Tensor, options) -> torch.Tensor:
    a = torch.exp(advantage.clamp(-options.adv_clip, options.adv_clip) / options.adv_temperature)
    return a / a.mean()
