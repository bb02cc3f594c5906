"""VRPO's options (every item of the spec, docs/vrpo.md) and the checks that refuse impossible ones."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch.distributed as dist

from vrpo.errors import ConfigError
from vrpo.objectives.alignment import AlignmentOptions
from vrpo.objectives.reg import check_global_token, global_token_defaults
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
    "lambda_variance": ("prior", "total"),
    "advantage_baseline": ("timestep", "global"),
}
# The choices version 2 of the spec changed (../shared/docs/vrpo.md, section 9); `spec: 1` selects
# version 1's. An option set explicitly keeps its value under either spec.
SPEC_DEFAULTS = {
    2: {"stability_centering": True, "stability_fraction": 0.25, "weight_shrinkage": 0.25, "weight_bounds": [0.1, 0.6],
        "lambda_variance": "prior", "standardize_pathwise": False, "advantage_baseline": "timestep",
        "grad_share_every": 500},
    1: {"stability_centering": False, "stability_fraction": 1.0, "weight_shrinkage": 1.0, "weight_bounds": [0.0, 1.0],
        "lambda_variance": "total", "standardize_pathwise": True, "advantage_baseline": "global",
        "grad_share_every": 50},
}  # fmt: skip


@dataclass
class VRPOOptions(AlignmentOptions):
    name: str = "vrpo"
    spec: int = 2  # the spec version whose defaults fill the options left unset (None) below
    rewards: list[str] = field(default_factory=lambda: list(REWARDS))
    # semantic
    semantic: str = "patch"  # patch (-L_REPA), global (head on mean-pooled h vs concat(global, mean token)), both
    # stability
    delta: float = 0.05  # second pass at t' = max(t - delta, 0)
    stability_fraction: float | None = None  # share of the batch given the stability pass (cost); v2 0.25, v1 1
    stability_centering: bool | None = None  # cosine of batch-centred projections (v2); v1: uncentred
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
    weight_shrinkage: float | None = None  # alpha: w = (1 - alpha) w0 + alpha u (u: inverse variance); v1 1
    weight_bounds: list[float] | None = None  # [w_min, w_max] of every adaptive weight; v2 [0.1, 0.6], v1 [0, 1]
    # m_R, v_R from EMA moments of the components under today's weights, or of R directly
    total_stats: str = "components"
    variance_eps: float = 1e-8  # floor of every variance that divides (raise it to bound 1 / sqrt(v_R))
    normalize: bool = True  # (R - m_R) / sqrt(v_R); off: raw R
    adaptive_lambda: bool = True  # lambda_s = clip(lambda_0 (v / v_ref)^kappa); off: lambda_0
    lambda_variance: str | None = None  # v: prior (of R under the prior weights w0, v2) or total (v_R, v1)
    lambda_0: float = 0.5
    kappa: float = 0.5
    lambda_min: float = 0.05
    lambda_max: float = 2.0
    # the two gradient paths
    pathwise: bool = True  # off: the rewards train only the heads (h detached)
    standardize_pathwise: bool | None = None  # v1: -lambda_s (R - m_R) / sqrt(v_R); v2: rewards on their own scale
    policy: bool = True  # off: a_i = 1
    group_size: int = 1  # G draws (noise, t) per image
    group_batch: str = "draws"  # draws: B/G images x G (REPA's cost); images: B images x G (cost x G)
    advantage_baseline: str | None = None  # timestep: per-t-bin EMA of R, group draws share t (v2); global (v1)
    timestep_bins: int = 8  # bins of t for the timestep baseline
    adv_clip: float = 2.0
    adv_temperature: float = 1.0
    # layer-selective injection
    layers: str = "block"  # block (d), early (round(3L/8)), mid (L/2, cut below L/4), all (every block)
    layer_projectors: str = "shared"  # layers=all: one projector for every block, or one per block
    grad_share_every: int | None = None  # steps between gradient-share measurements at block d; 0: off
    # REG's token (the paper's VRPO generalises REG): the encoder's global vector denoised beside the image
    global_token: bool = False
    global_weight: float = 0.03  # on the token's denoising loss (not policy-weighted)

    def __post_init__(self):
        for key, value in SPEC_DEFAULTS.get(self.spec, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)

    @classmethod
    def from_saved(cls, section: dict) -> dict:
        # runs saved before version 2 have no spec key: they ran version 1, whatever today's default
        return section if "spec" in section else {**section, "spec": 1}

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        """lambda_s w_k per reward (v1: lambda_s w_k / sqrt(v_R)), as logged (coef_k) or, in logs from
        before it was, from the logged lambda_s, w_k and R_var; 0 with the pathwise path off (the
        rewards then train only the heads, never the network)."""
        if "lambda_s" not in record:
            return {}
        token = {"global_token": self.global_weight} if self.global_token else {}
        if not self.pathwise:
            return {**{k: 0.0 for k in self.rewards}, **token}
        scale = record["lambda_s"] * self.logged_scale(record)
        if self.standardize_pathwise and self.normalize:
            scale /= math.sqrt(max(record["R_var"], self.variance_eps))
        logged = {k: record[f"coef_{k}"] if f"coef_{k}" in record else scale * record[f"w_{k}"] for k in self.rewards}
        return {**logged, **token}

    def alignment_schedule(self, record: dict[str, float]) -> dict[str, float]:
        """lambda_s and the reward weights w_k as logged (v1's 1 / sqrt(v_R) is in its coefficients)."""
        if "lambda_s" not in record:
            return {}
        weights = {f"w_{k}": record[f"w_{k}"] for k in self.rewards if f"w_{k}" in record}
        return {"lambda_s": record["lambda_s"], **weights}

    def model_defaults(self, arch: str) -> dict:
        return global_token_defaults(self.encoders) if self.global_token else {}

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if self.global_token:
            check_global_token(cfg, self.encoders, self.global_weight)
            if family_of(cfg.model.arch) != "flow":
                raise ConfigError("objective.global_token (REG's token) trains SiT-* (flow) models only")
        if self.spec not in SPEC_DEFAULTS:
            raise ConfigError(f"objective.spec must be one of {', '.join(map(str, SPEC_DEFAULTS))}, got {self.spec!r}")
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
        need(
            not (self.grad_share_every and cfg.train.parallel == "fsdp"),
            "objective.grad_share_every measures gradients of whole block parameters, which FSDP2 shards: set "
            "objective.grad_share_every=0 under train.parallel=fsdp",
        )
        need(self.variance_eps > 0.0, "objective.variance_eps must be > 0")
        need(
            0.0 <= self.weight_shrinkage <= 1.0,
            f"objective.weight_shrinkage must be in [0, 1], got {self.weight_shrinkage}",
        )
        bounds = self.weight_bounds
        need(
            len(bounds) == 2 and 0.0 <= bounds[0] <= bounds[1] <= 1.0,
            f"objective.weight_bounds must be [w_min, w_max] with 0 <= w_min <= w_max <= 1, got {bounds}",
        )
        low, high = bounds
        k = len(self.rewards)
        need(
            k == 1 or k * low <= 1.0 <= k * high,
            f"objective.weight_bounds {self.weight_bounds} admit no weights of {k} rewards that sum to 1",
        )
        need(self.timestep_bins >= 1, "objective.timestep_bins must be >= 1")
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
