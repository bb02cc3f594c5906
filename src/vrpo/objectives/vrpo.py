"""VRPO: REPA's alignment quantities turned into variance-normalised rewards.

The spec is /work/shared/docs/vrpo.md; docs/vrpo.md maps every item to an option and
records the choices where the spec is silent. Per sample i at its timestep: semantic
(patch and/or global cosine to a frozen encoder), stability (cosine to a gradient-free
pass of blocks 1..d at t - delta) and fidelity (Frechet distance of pooled projections
to EMA statistics of real features). Components are weighted by inverse variance into
R_i, normalised by running statistics of R, and reach the network two ways: pathwise
(the differentiable rewards, blocks 1..d and the heads only) and policy (a positive
per-sample weight on the denoising loss). Running statistics are buffers: accumulated
during ``loss`` (every micro-batch) and committed once per optimizer step in
``end_of_step``, averaged over ranks, so gradient accumulation and DDP see one update
per step and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vrpo.models import Projector
from vrpo.objectives.alignment import AlignmentOptions
from vrpo.objectives.base import Batch, LossOutput
from vrpo.objectives.repa import REPA
from vrpo.utils.dist import all_reduce_mean

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
    total_stats: str = "components"  # m_R, v_R from EMA moments of the components under today's weights, or of R directly
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
        from vrpo.config import ConfigError

        super().validate(cfg)
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"objective.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        unknown = [r for r in self.rewards if r not in REWARDS]
        if unknown or not self.rewards or len(set(self.rewards)) != len(self.rewards):
            raise ConfigError(f"objective.rewards must list distinct names out of {', '.join(REWARDS)}, got {self.rewards!r}")

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(0.0 < self.delta < 1.0, f"objective.delta must be in (0, 1), got {self.delta}")
        need(0.0 < self.stability_fraction <= 1.0, f"objective.stability_fraction must be in (0, 1], got {self.stability_fraction}")
        need(self.fidelity_floor < 0.0, f"objective.fidelity_floor must be negative (a lower bound of -FD/D), got {self.fidelity_floor}")
        for key in ("stats_decay", "real_stats_decay"):
            need(0.0 <= getattr(self, key) < 1.0, f"objective.{key} must be in [0, 1), got {getattr(self, key)}")
        need(self.warmup_steps >= 0, "objective.warmup_steps must be >= 0")
        need(self.grad_share_every >= 0, "objective.grad_share_every must be >= 0 (0: off)")
        need(self.variance_eps > 0.0, "objective.variance_eps must be > 0")
        weights = [getattr(self, f"weight_{r}") for r in self.rewards]
        need(min(weights) >= 0.0 and sum(weights) > 0.0, f"objective.weight_* of the enabled rewards must be >= 0 with a positive sum, got {weights}")
        need(0.0 < self.lambda_min <= self.lambda_max, f"objective needs 0 < lambda_min <= lambda_max, got {self.lambda_min}, {self.lambda_max}")
        need(self.lambda_0 >= 0.0 and self.kappa >= 0.0, "objective.lambda_0 and objective.kappa must be >= 0")
        need(self.adv_clip > 0.0 and self.adv_temperature > 0.0, "objective.adv_clip and objective.adv_temperature must be > 0")
        need(self.pathwise or self.policy, "objective.pathwise and objective.policy are both off: the rewards would not train the network (use objective.name=sit)")
        need(self.group_size >= 1, "objective.group_size must be >= 1")
        if self.group_size > 1:
            need(self.policy, "objective.group_size > 1 only changes the policy path: set objective.policy=true")
            rows = micro_batch(cfg)
            need(self.group_batch == "images" or rows % self.group_size == 0,
                 f"objective.group_size {self.group_size} does not divide the per-rank micro-batch of {rows} (group_batch=draws)")
        need(self.layers == "block" or self.encoder_depth == 0,
             f"objective.encoder_depth is set by objective.layers={self.layers}: leave it 0")
        need(self.layer_projectors == "shared" or self.layers == "all", "objective.layer_projectors=per_block needs objective.layers=all")
        if self.perceptual == "lpips":
            need("fidelity" in self.rewards, "objective.perceptual=lpips is part of the fidelity reward: add fidelity to objective.rewards")
            need(cfg.data.name != "tensors", "objective.perceptual=lpips compares pixels: it is not available for latent data (data.name=tensors)")
            need(cfg.transport.interpolant == "linear" and cfg.transport.prediction == "velocity",
                 "objective.perceptual=lpips needs x0_hat = x_t - t v: transport.interpolant=linear and transport.prediction=velocity")


def micro_batch(cfg) -> int:
    """Images per loss() call on one rank: the global batch split over ranks and accumulation."""
    import torch.distributed as dist

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


class Reward(NamedTuple):
    sample: torch.Tensor  # [B] per-sample value (advantages, R statistics)
    batch: torch.Tensor  # scalar the pathwise loss differentiates (and whose variance weights it)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_reward_terms(g: torch.Tensor, mean: torch.Tensor, second: torch.Tensor, root: torch.Tensor | None) -> torch.Tensor:
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
            f"objective.perceptual=lpips needs the lpips package and its pretrained AlexNet weights, which could not be loaded ({reason}); "
            "install them where the weights can be fetched, or set objective.perceptual=off"
        ) from None
    return net.eval().requires_grad_(False)


class VRPO(REPA):
    name = "vrpo"
    Options = VRPOOptions

    def __init__(self, options: VRPOOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        from vrpo.config import ConfigError

        o = options
        self.rewards = [r for r in REWARDS if r in o.rewards]
        self.layers, self.cut = layer_plan(o.layers, model.depth, self.align.depth)
        self.layer_notice = None
        if o.layers == "early" and self.layers == [self.align.depth]:  # shallow models: early is the default block
            self.layer_notice = (f"VRPO: objective.layers=early resolves to block {self.align.depth} at depth {model.depth}, the block "
                                 "that objective.layers=block uses: this run repeats the default placement")
        self.grad_block = max(self.layers)  # where gradient shares are measured
        # mid: the reward branch is a second pass cut at block `cut` (the main pass keeps its graph)
        self.second_pass = o.pathwise and self.cut > 0
        encoders = self.align.encoders
        if "fidelity" in self.rewards and o.fidelity == "full":
            rows = micro_batch(cfg) * (o.group_size if o.group_batch == "images" else 1)
            for e in encoders:
                if rows <= e.token_dim:
                    raise ConfigError(f"objective.fidelity=full needs more rows per rank ({rows}) than {e.name}'s feature dimension {e.token_dim}: use fidelity=diagonal or a larger batch")
        # per_block: block 1 keeps the alignment projectors, the others get their own
        self.block_projectors = None
        if o.layer_projectors == "per_block":
            self.block_projectors = nn.ModuleList(
                nn.ModuleList(Projector(model.hidden_size, e.token_dim, o.projector_width) for e in encoders) for _ in self.layers[1:]
            )
        self.global_heads = None
        if "semantic" in self.rewards and o.semantic != "patch":
            self.global_heads = nn.ModuleList(nn.Linear(model.hidden_size, e.global_dim + e.token_dim) for e in encoders)
            for head in self.global_heads:  # the paper's appendix: initialised to identity
                nn.init.eye_(head.weight)
                nn.init.zeros_(head.bias)
        self.__dict__["lpips"] = load_lpips() if o.perceptual == "lpips" else None  # frozen, not checkpointed

        k = len(self.rewards)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # committed steps (bias correction)
        self.register_buffer("reward_moments", torch.zeros(2, k, **f64))  # EMA of each batch mean and its square
        # per-sample moments: of the components (mean r_i, mean r_i r_i^T), and of R_i as it was computed
        self.register_buffer("sample_first", torch.zeros(k, **f64))
        self.register_buffer("sample_second", torch.zeros(k, k, **f64))
        self.register_buffer("total_moments", torch.zeros(2, **f64))
        self.register_buffer("v_R_ref", torch.zeros((), **f64))  # 0 until the end of warm-up
        if "fidelity" in self.rewards:
            for j, e in enumerate(encoders):
                second = (e.token_dim, e.token_dim) if o.fidelity == "full" else (e.token_dim,)
                self.register_buffer(f"real_first_{j}", torch.zeros(e.token_dim, **f64))
                self.register_buffer(f"real_second_{j}", torch.zeros(second, **f64))
        self.share_names = ["denoise", "align", *self.rewards]
        self.register_buffer("grad_share", torch.zeros(len(self.share_names)))  # last measurement, logged every step
        self._pending: list[torch.Tensor] = []
        self._reference: tuple[int, list] | None = None
        self._counts: dict | None = None

    def hidden_layers(self) -> tuple[int, ...]:
        return () if self.second_pass else tuple(self.layers)

    def finalize(self, run_dir) -> list:
        plot = plot_vrpo(run_dir)
        return [plot] if plot else []

    def _load_from_state_dict(self, *args, **kwargs):
        self._reference, self._pending, self._counts = None, [], None  # derived from the buffers being replaced
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------ statistics (constants inside loss)

    def counts(self) -> dict:
        """The counters as Python values, read from the buffers once and then kept in step, so
        that the loss never waits for the device to decide a branch."""
        if self._counts is None:
            self._counts = {"updates": int(self.updates), "steps": int(self.steps_done), "ref_set": float(self.v_R_ref) > 0}
        return self._counts

    def _corrected(self, buffer: torch.Tensor, decay: float) -> torch.Tensor:
        return buffer / (1 - decay ** self.counts()["updates"])

    def reward_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Bias-corrected EMA mean m_k and variance v_k of each component's batch mean."""
        if self.counts()["updates"] == 0:
            return None
        first, second = self._corrected(self.reward_moments, self.options.stats_decay)
        return first, (second - first**2).clamp_min(0)

    def total_stats(self, w: torch.Tensor, total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """m_R and the per-sample variance v_R of R = w . r; this batch's own (``total``) before
        any history. ``components``: from the components' moments, so a change of weights
        (the end of warm-up) does not leave R's statistics on another scale."""
        o = self.options
        if self.counts()["updates"] == 0:
            r = total.detach().double()
            return r.mean(), r.var(unbiased=False).clamp_min(o.variance_eps)
        if o.total_stats == "direct":
            first, second = self._corrected(self.total_moments, o.stats_decay)
            return first, (second - first**2).clamp_min(o.variance_eps)
        first = self._corrected(self.sample_first, o.stats_decay)
        cov = self._corrected(self.sample_second, o.stats_decay) - torch.outer(first, first)
        return w @ first, (w @ cov @ w).clamp_min(o.variance_eps)

    def weights(self) -> torch.Tensor:
        o = self.options
        stats, counts = self.reward_stats(), self.counts()
        if o.weighting == "fixed" or counts["steps"] < o.warmup_steps or counts["updates"] < 2:
            w = self.reward_moments.new_tensor([getattr(o, f"weight_{r}") for r in self.rewards])
        else:
            w = 1.0 / (stats[1] + o.variance_eps)
        return w / w.sum()

    def lambda_s(self, v_R: torch.Tensor) -> float | torch.Tensor:
        o = self.options
        if not o.adaptive_lambda or not self.counts()["ref_set"]:
            return o.lambda_0
        return (o.lambda_0 * (v_R / self.v_R_ref) ** o.kappa).clamp(o.lambda_min, o.lambda_max)

    def reference(self, real: list[torch.Tensor]) -> list[tuple]:
        """Real-feature (mean, variance or covariance, covariance root) per encoder; this
        batch's before any history. Cached per committed step (the root costs an eigh)."""
        n = self.counts()["updates"]
        if n and self._reference is not None and self._reference[0] == n:
            return self._reference[1]
        full = self.options.fidelity == "full"
        out = []
        for j, f in enumerate(real):
            if n == 0:
                f = f.detach().double()
                first, second = f.mean(0), (f.T @ f / f.shape[0] if full else f.pow(2).mean(0))
            else:
                decay = self.options.real_stats_decay
                first = self._corrected(getattr(self, f"real_first_{j}"), decay)
                second = self._corrected(getattr(self, f"real_second_{j}"), decay)
            if full:
                cov = second - torch.outer(first, first)
                out.append((first, cov, psd_sqrt(cov)))
            else:
                out.append((first, (second - first**2).clamp_min(0), None))
        self._reference = (n, out)
        return out

    def record(self, components: torch.Tensor, samples: torch.Tensor, total: torch.Tensor, real: list[torch.Tensor]) -> None:
        """Keep one micro-batch's statistics (batch values [K], per-sample components [K, B],
        R_i [B], real features) until ``end_of_step`` commits the step."""
        samples = samples.detach().double()
        parts = [components.detach().double(), samples.mean(1), samples @ samples.T / samples.shape[1],
                 torch.stack([total.mean(), total.pow(2).mean()]).detach().double()]
        for f in real:
            f = f.detach().double()
            parts += [f.mean(0), (f.T @ f / f.shape[0] if self.options.fidelity == "full" else f.pow(2).mean(0))]
        self._pending.append(torch.cat([p.flatten() for p in parts]))

    def end_of_step(self, step: int, applied: bool) -> None:
        pending, self._pending = self._pending, []
        counts = self.counts()
        self.steps_done.fill_(step + 1)
        counts["steps"] = step + 1
        if not applied or not pending:
            return  # a skipped step leaves every statistic as it was
        # Equal micro-batches on every rank: the mean of the means is the global batch's.
        stats = all_reduce_mean(torch.stack(pending).mean(0))
        o, k = self.options, len(self.rewards)
        self.updates += 1
        counts["updates"] += 1
        comps, stats = stats[:k], stats[k:]
        self.reward_moments.mul_(o.stats_decay).add_((1 - o.stats_decay) * torch.stack([comps, comps**2]))
        names = ["sample_first", "sample_second", "total_moments"]
        if "fidelity" in self.rewards:
            names += [f"real_{m}_{j}" for j in range(len(self.align.encoders)) for m in ("first", "second")]
        for name in names:
            buf = getattr(self, name)
            decay = o.real_stats_decay if name.startswith("real") else o.stats_decay
            buf.mul_(decay).add_((1 - decay) * stats[: buf.numel()].view_as(buf))
            stats = stats[buf.numel():]
        if not counts["ref_set"] and step + 1 >= o.warmup_steps:
            # under the weights that apply from the next step on, so lambda_s starts at lambda_0
            self.v_R_ref.copy_(self.total_stats(self.weights())[1])
            counts["ref_set"] = True

    # ------------------------------------------------------------ passes

    def grouped(self, batch: Batch) -> tuple[Batch, Batch]:
        """(rows the network sees: each image G times in a row, the distinct images)."""
        g = self.options.group_size
        if g == 1:
            return batch, batch

        def rows(b: Batch, fn) -> Batch:
            return Batch(**{f.name: None if getattr(b, f.name) is None else fn(getattr(b, f.name)) for f in fields(Batch)})

        n = batch.x.shape[0]
        if self.options.group_batch == "draws":
            if n % g:
                raise RuntimeError(f"objective.group_size {g} does not divide this micro-batch of {n} images")
            batch = rows(batch, lambda v: v[: n // g])
        return rows(batch, lambda v: v.repeat_interleave(g, 0)), batch

    def project_layer(self, hidden: torch.Tensor, position: int) -> list[torch.Tensor]:
        heads = None if self.block_projectors is None or position == 0 else self.block_projectors[position - 1]
        return self.align.project(hidden, heads)

    def reward_hidden(self, model, step) -> dict[int, torch.Tensor]:
        if self.second_pass:  # mid: blocks cut+1..d only, on the same inputs
            out = model(step.x_t, step.t * self.transport.time_scale, step.labels, hidden_layers=self.layers,
                        stop_after=max(self.layers), detach_after=self.cut)
            return out.hidden
        if self.options.pathwise:
            return step.hidden
        return {i: h.detach() for i, h in step.hidden.items()}  # the rewards then train only the heads

    @torch.no_grad()
    def stability_targets(self, model, batch: Batch, step) -> dict[int, list[torch.Tensor]]:
        """stopgrad(phi(h_t')) at t' = max(t - delta, 0), SAME noise, blocks 1..max(layers) only."""
        n = max(1, round(self.options.stability_fraction * batch.x.shape[0]))
        t = (step.t[:n] - self.options.delta).clamp_min(0)
        x_t = self.interpolant.sample(batch.x[:n], step.noise[:n], t)
        labels = None if step.labels is None else step.labels[:n]
        out = model(x_t, t * self.transport.time_scale, labels, hidden_layers=self.layers, stop_after=max(self.layers))
        return {i: self.project_layer(out.hidden[i], p) for p, i in enumerate(self.layers)}

    # ------------------------------------------------------------ rewards

    def global_cosine(self, hidden: torch.Tensor, globals_: list[torch.Tensor]) -> torch.Tensor:
        pooled = hidden.mean(dim=1)
        sims = [F.cosine_similarity(head(pooled).float(), y, dim=-1) for head, y in zip(self.global_heads, globals_)]
        return torch.stack(sims).mean(dim=0)

    def clip_fidelity(self, r: torch.Tensor) -> torch.Tensor:
        floor = self.options.fidelity_floor
        return r.clamp_min(floor) if self.options.fidelity_clip == "hard" else floor * torch.tanh(r / floor)

    def fidelity_reward(self, projected: list[torch.Tensor], reference: list[tuple]) -> Reward:
        samples, batches = [], []
        for z, (mean, second, root) in zip(projected, reference):
            g = z.float().mean(dim=1)  # pooled over tokens
            dim = g.shape[1]
            samples.append(self.clip_fidelity(-(g.double() - mean).pow(2).sum(1).float() / dim))
            batches.append(self.clip_fidelity(-frechet_reward_terms(g, mean, second, root).float() / dim))
        sample = torch.stack(samples).mean(0)
        batch = sample.mean() if self.options.fidelity_pathwise == "sample" else torch.stack(batches).mean()
        return Reward(sample, batch)

    def layer_rewards(self, position: int, hidden, after, targets, globals_, reference) -> dict[str, Reward]:
        o, out = self.options, {}
        z = self.project_layer(hidden, position)
        if "semantic" in self.rewards:
            parts = []
            if o.semantic != "global":
                parts.append(self.align.cosine(z, targets))
            if o.semantic != "patch":
                parts.append(self.global_cosine(hidden, globals_))
            r = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
            out["semantic"] = Reward(r, r.mean())
        if "stability" in self.rewards:
            n = after[0].shape[0]
            r = self.align.cosine([p[:n] for p in z], after)
            # rows outside the stability subset take its mean (advantages need every row)
            out["stability"] = Reward(torch.cat([r, r.detach().mean().expand(z[0].shape[0] - n)]), r.mean())
        if "fidelity" in self.rewards:
            out["fidelity"] = self.fidelity_reward(z, reference)
        return out

    def perceptual(self, batch: Batch, step) -> torch.Tensor:
        """-LPIPS(x0_hat, x) per sample, x0_hat = x_t - t v_theta; no gradient (advantage only)."""
        with torch.no_grad():
            t = step.t.view(-1, *([1] * (batch.x.dim() - 1)))
            x0 = (step.x_t - t * step.prediction).clamp(-1, 1).float()
            x = batch.x.float()
            if x.shape[1] == 1:  # LPIPS reads RGB
                x0, x = x0.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
            return -self.lpips.to(x.device)(x0, x).flatten()

    def advantages(self, total: torch.Tensor, m_R, v_R) -> torch.Tensor:
        g, total = self.options.group_size, total.double()  # rewards differ in late digits
        if g > 1:  # GRPO: relative to the other draws of the same image
            groups = total.view(-1, g)
            return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).flatten().float()
        if self.options.normalize:
            return ((total - m_R) / v_R.sqrt()).float()
        return total.float()  # a_i is normalised to mean 1, so a shift would change nothing but the clip

    def policy_weights(self, advantage: torch.Tensor) -> torch.Tensor:
        o = self.options
        a = torch.exp(advantage.clamp(-o.adv_clip, o.adv_clip) / o.adv_temperature)
        return a / a.mean()

    # ------------------------------------------------------------ loss

    def terms(self, model, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(L_denoise(a), L_align, logs); ``loss`` is their sum."""
        o = self.options
        batch, images = self.grouped(batch)
        g = batch.x.shape[0] // images.x.shape[0]
        step = self.denoise(model, batch, generator)
        outputs = self.align.encoder_outputs(images)
        on_grid = self.align.on_model_grid(outputs)  # every reward uses the same resampled targets
        targets = [y.repeat_interleave(g, 0) for y in on_grid]
        globals_ = [torch.cat([glob, tokens.mean(1)], -1).repeat_interleave(g, 0) for tokens, glob in outputs]
        real = [y.mean(dim=1) for y in on_grid] if "fidelity" in self.rewards else []
        reference = self.reference(real) if real else []
        hidden = self.reward_hidden(model, step)
        after = self.stability_targets(model, batch, step) if "stability" in self.rewards else {}
        per_layer = [self.layer_rewards(p, hidden[i], after.get(i), targets, globals_, reference) for p, i in enumerate(self.layers)]
        rewards = {k: Reward(*(torch.stack(v).mean(0) for v in zip(*(r[k] for r in per_layer)))) for k in self.rewards}
        if self.lpips is not None:
            extra = self.perceptual(batch, step)
            fid = rewards["fidelity"]
            rewards["fidelity"] = Reward(fid.sample + extra, fid.batch + extra.mean())

        w = self.weights()
        samples = torch.stack([rewards[k].sample.detach().double() for k in self.rewards])
        batch_values = torch.stack([rewards[k].batch for k in self.rewards])
        total = (w[:, None] * samples).sum(0)  # R_i, no gradient
        m_R, v_R = self.total_stats(w, total)
        lam = self.lambda_s(v_R)
        scale = lam / v_R.sqrt() if o.normalize else lam
        # each component's pathwise term
        reward_terms = (-scale * w).float() * batch_values.float()
        align = reward_terms.sum()
        if o.normalize:  # centre with the running mean of what is differentiated (a constant: value only)
            stats = self.reward_stats()
            centre = w @ stats[0] if stats is not None else w @ batch_values.detach().double()
            align = align + (scale * centre).float()
        advantage = self.advantages(total, m_R, v_R)
        if o.policy:
            a = self.policy_weights(advantage)
            denoise = (a.detach() * step.per_sample_loss).mean()
        else:
            a = torch.ones_like(advantage)
            denoise = step.per_sample_loss.mean()

        if torch.is_grad_enabled():  # a training pass (not an evaluation under no_grad)
            self.record(batch_values, samples, total, real)
            every = o.grad_share_every
            if every and self.counts()["steps"] % every == 0:
                self.grad_share.copy_(self.gradient_shares(model, denoise, reward_terms))

        logs = {"loss_denoise": denoise.detach(), "loss_align": align.detach(), "lambda_s": lam,
                "loss_denoise_unweighted": step.per_sample_loss.mean().detach(),  # comparable with SiT's and REPA's
                "R_mean": total.mean().float(), "R_var": v_R.float(),
                "adv_mean": advantage.mean(), "adv_std": advantage.std(unbiased=False), "adv_min": advantage.min(),
                "adv_max": advantage.max(), "pw_min": a.min().detach(), "pw_max": a.max().detach()}
        stats = self.reward_stats()
        for j, k in enumerate(self.rewards):
            logs[f"r_{k}"] = batch_values[j].detach()
            logs[f"r_{k}_var"] = stats[1][j].float() if stats is not None else 0.0
            logs[f"w_{k}"] = w[j].float()
        if o.grad_share_every:
            logs.update({f"gshare_{n}": v for n, v in zip(self.share_names, self.grad_share)})
        return denoise, align, logs

    def warnings(self, record: dict[str, float]) -> dict[str, str]:
        o = self.options
        found = {}
        if self.layer_notice:
            found["layers_is_block"] = self.layer_notice
        weights = {k: record[f"w_{k}"] for k in self.rewards if f"w_{k}" in record}
        if o.weighting == "inverse_variance" and len(weights) >= 2 and max(weights.values()) >= 0.95:
            top = max(weights, key=weights.get)
            variances = ", ".join(f"{k} {record.get(f'r_{k}_var', float('nan')):.1e}" for k in weights)
            found["dominant_weight"] = (
                f"VRPO: the inverse-variance weights give the {top} reward {weights[top]:.1%} of the total (reward variances: "
                f"{variances}), so the other rewards no longer train the projector; with stability on top this collapsed the "
                "projector on the embedded benchmark (docs/results.md). Options: objective.weighting=fixed, objective.variance_eps=1e-3")
        return found

    def loss(self, model, batch: Batch, generator: torch.Generator) -> LossOutput:
        denoise, align, logs = self.terms(model, batch, generator)
        return LossOutput(denoise + align, logs)

    def gradient_shares(self, model, denoise: torch.Tensor, reward_terms: torch.Tensor) -> torch.Tensor:
        """Norm shares at the block carrying the rewards: [denoise, align] of their sum, then
        each reward of the sum of the reward norms. Costs 1 + K partial backward passes."""
        params = [p for p in model.blocks[self.grad_block - 1].parameters() if p.requires_grad]

        def grad(term: torch.Tensor) -> torch.Tensor:
            if not term.requires_grad:
                return torch.zeros(sum(p.numel() for p in params), device=term.device)
            gs = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().float() for g, p in zip(gs, params)])

        parts = [grad(term) for term in reward_terms]
        norms = torch.stack([grad(denoise).norm(), torch.stack(parts).sum(0).norm()])
        reward_norms = torch.stack([v.norm() for v in parts])
        return torch.cat([norms / norms.sum().clamp_min(1e-30), reward_norms / reward_norms.sum().clamp_min(1e-30)]).detach()


def plot_vrpo(run_dir: str | Path) -> Path | None:
    """RUN/vrpo_weights.png: the weights w_k and lambda_s over training, from RUN/log.jsonl."""
    from vrpo.train.logging import read_log

    run_dir = Path(run_dir)
    records = [r for r in read_log(run_dir / "log.jsonl") if "lambda_s" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for k in REWARDS:
        if f"w_{k}" in records[0]:
            top.plot(steps, [r[f"w_{k}"] for r in records], label=k)
    top.set_ylabel("weight w_k")
    top.legend()
    bottom.plot(steps, [r["lambda_s"] for r in records], color="k")
    bottom.set_ylabel("lambda_s")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "vrpo_weights.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
