"""VRPO's options (every item of the spec, docs/vrpo.md) and the checks that refuse impossible ones."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch.distributed as dist

from vrpo.errors import ConfigError
from vrpo.objectives.alignment import AlignmentOptions
from vrpo.transport.noising import family_of

REWARDS = ("semantic", "stability", "fidelity")  # canonical order of the components
_CHOICES = {
    "semantic": ("patch", "global", "both"),
    "fidelity": ("diagonal", "full"),
    "fidelity_clip": ("hard", "soft"),
    "fidelity_pathwise": ("batch", "sample"),
    "perceptual": ("off", "lpips"),
    "weighting": ("inverse_variance", "fixed"),
    "total_stats": ("components", "direct"),
    "group_batch": ("draws", "images"),
    "layers": ("block", "early", "mid", "all"),
    "layer_projectors": ("shared", "per_block"),
}


@dataclass
class VRPOOptions(AlignmentOptions):
    name: str = "vrpo"
    rewards: list[str] = field(default_factory=lambda: list(REWARDS))
    # semantic
    semantic: str = "patch"  # patch (-L_REPA), global (head on mean-pooled h vs concat(global, mean token)), both
    # stability
    delta: float = 0.05  # second pass at t' = max(t - delta, 0)
    stability_fraction: float = 1.0  # share of the batch given the stability pass (cost)
    # fidelity
    fidelity: str = "diagonal"  # diagonal or full (covariance) Frechet distance
    fidelity_floor: float = -10.0  # lower bound of the fidelity reward (FD per dimension, negated)
    fidelity_clip: str = "hard"  # hard: clamp at the floor; soft: floor * tanh(r / floor), keeps a gradient
    fidelity_pathwise: str = "batch"  # what the pathwise loss differentiates: batch-level r_fid or the per-sample share
    perceptual: str = "off"  # lpips: add -LPIPS(x0_hat, x) to fidelity (pixel data; advantage only)
    # statistics and weights
    stats_decay: float = 0.99  # EMA of the reward statistics
    real_stats_decay: float = 0.99  # EMA of the real-feature statistics
    warmup_steps: int = 500  # fixed weights and lambda_0 until then; v_R_ref is taken at its end
    weighting: str = "inverse_variance"  # or fixed (the weights below, renormalised over the enabled rewards)
    weight_semantic: float = 0.5
    weight_fidelity: float = 0.3
    weight_stability: float = 0.2
    total_stats: str = (
        "components"  # m_R, v_R from EMA moments of the components under today's weights, or of R directly
    )
    variance_eps: float = 1e-8  # floor of every variance that divides (raise it to bound 1 / sqrt(v_R))
    normalize: bool = True  # (R - m_R) / sqrt(v_R); off: raw R
    adaptive_lambda: bool = True  # lambda_s = clip(lambda_0 (v_R / v_R_ref)^kappa); off: lambda_0
    lambda_0: float = 0.5
    kappa: float = 0.5
    lambda_min: float = 0.05
    lambda_max: float = 2.0
    # the two gradient paths
    pathwise: bool = True  # off: the rewards train only the heads (h detached)
    policy: bool = True  # off: a_i = 1
    group_size: int = 1  # G draws (noise, t) per image
    group_batch: str = "draws"  # draws: B/G images x G (REPA's cost); images: B images x G (cost x G)
    adv_clip: float = 2.0
    adv_temperature: float = 1.0
    # layer-selective injection
    layers: str = "block"  # block (d), early (round(3L/8)), mid (L/2, cut below L/4), all (every block)
    layer_projectors: str = "shared"  # layers=all: one projector for every block, or one per block
    grad_share_every: int = 50  # steps between gradient-share measurements at block d; 0: off

    def validate(self, cfg) -> None:
        super().validate(cfg)
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"objective.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        unknown = [r for r in self.rewards if r not in REWARDS]
        if unknown or not self.rewards or len(set(self.rewards)) != len(self.rewards):
            raise ConfigError(
                f"objective.rewards must list distinct names out of {', '.join(REWARDS)}, got {self.rewards!r}"
            )

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(0.0 < self.delta < 1.0, f"objective.delta must be in (0, 1), got {self.delta}")
        need(
            0.0 < self.stability_fraction <= 1.0,
            f"objective.stability_fraction must be in (0, 1], got {self.stability_fraction}",
        )
        need(
            self.fidelity_floor < 0.0,
            f"objective.fidelity_floor must be negative (a lower bound of -FD/D), got {self.fidelity_floor}",
        )
        for key in ("stats_decay", "real_stats_decay"):
            need(0.0 <= getattr(self, key) < 1.0, f"objective.{key} must be in [0, 1), got {getattr(self, key)}")
        need(self.warmup_steps >= 0, "objective.warmup_steps must be >= 0")
        need(self.grad_share_every >= 0, "objective.grad_share_every must be >= 0 (0: off)")
        need(self.variance_eps > 0.0, "objective.variance_eps must be > 0")
        weights = [getattr(self, f"weight_{r}") for r in self.rewards]
        need(
            min(weights) >= 0.0 and sum(weights) > 0.0,
            f"objective.weight_* of the enabled rewards must be >= 0 with a positive sum, got {weights}",
        )
        need(
            0.0 < self.lambda_min <= self.lambda_max,
            f"objective needs 0 < lambda_min <= lambda_max, got {self.lambda_min}, {self.lambda_max}",
        )
        need(self.lambda_0 >= 0.0 and self.kappa >= 0.0, "objective.lambda_0 and objective.kappa must be >= 0")
        need(
            self.adv_clip > 0.0 and self.adv_temperature > 0.0,
            "objective.adv_clip and objective.adv_temperature must be > 0",
        )
        need(
            self.pathwise or self.policy,
            "objective.pathwise and objective.policy are both off: the rewards would not train the network (use "
            "objective.name=sit)",
        )
        need(self.group_size >= 1, "objective.group_size must be >= 1")
        if self.group_size > 1:
            need(self.policy, "objective.group_size > 1 only changes the policy path: set objective.policy=true")
            rows = micro_batch(cfg)
            need(
                self.group_batch == "images" or rows % self.group_size == 0,
                f"objective.group_size {self.group_size} does not divide the per-rank micro-batch of {rows} "
                "(group_batch=draws)",
            )
        need(
            self.layers == "block" or self.encoder_depth == 0,
            f"objective.encoder_depth is set by objective.layers={self.layers}: leave it 0",
        )
        need(
            self.layer_projectors == "shared" or self.layers == "all",
            "objective.layer_projectors=per_block needs objective.layers=all",
        )
        if self.perceptual == "lpips":
            need(
                "fidelity" in self.rewards,
                "objective.perceptual=lpips is part of the fidelity reward: add fidelity to objective.rewards",
            )
            need(
                cfg.data.name != "tensors",
                "objective.perceptual=lpips compares pixels: it is not available for latent data (data.name=tensors)",
            )
            need(
                family_of(cfg.model.arch) == "flow"
                and cfg.transport.interpolant == "linear"
                and cfg.transport.prediction == "velocity",
                "objective.perceptual=lpips needs x0_hat = x_t - t v: a SiT-* model, transport.interpolant=linear "
                "and transport.prediction=velocity",
            )


def micro_batch(cfg) -> int:
    """Images per loss() call on one rank: the global batch split over ranks and accumulation."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, cfg.train.batch_size // (cfg.train.grad_accum * world))


def layer_plan(mode: str, depth: int, block: int) -> tuple[list[int], int]:
    """(blocks whose outputs carry rewards, block below which reward gradients are cut; 0: none)."""
    if mode == "early":  # the middle of the first 25-50%
        return [max(1, math.floor(0.375 * depth + 0.5))], 0
    if mode == "mid":
        return [max(1, depth // 2)], depth // 4
    if mode == "all":
        return list(range(1, depth + 1)), 0
    return [block], 0
