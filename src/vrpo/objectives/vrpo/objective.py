"""VRPO: the alignment quantities turned into variance-normalised rewards.

The spec is ../shared/docs/vrpo.md; docs/vrpo.md maps every item to an option and records
the choices where the spec is silent. Components are weighted into R_i (inverse variance or
fixed), normalised by running statistics of R, and reach the network two ways: pathwise (the
differentiable rewards, blocks 1..d and the heads only) and policy (a positive per-sample
weight on the denoising loss).
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn as nn

from vrpo.errors import ConfigError
from vrpo.objectives.alignment import AlignmentObjective, build_projector
from vrpo.objectives.base import Batch, DenoisingStep, LossOutput
from vrpo.objectives.cosine import projection_rewards
from vrpo.objectives.vrpo.diagnostics import dominant_weight, gradient_shares, plot_vrpo
from vrpo.objectives.vrpo.options import REWARDS, VRPOOptions, layer_plan, micro_batch
from vrpo.objectives.vrpo.rewards import (
    Reward,
    advantages,
    correlation,
    fidelity_reward,
    global_cosine,
    load_lpips,
    perceptual_reward,
    policy_weights,
)
from vrpo.objectives.vrpo.statistics import RewardStatistics
from vrpo.utils.dist import all_reduce_mean


def repeat_rows(x: torch.Tensor, g: int) -> torch.Tensor:
    """Each row G times in a row (a group's draws); G = 1 returns x itself, not a full-size copy."""
    return x if g == 1 else x.repeat_interleave(g, 0)


class VRPO(RewardStatistics, AlignmentObjective):
    name = "vrpo"
    Options = VRPOOptions

    def __init__(self, options: VRPOOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        o, depth = options, self.alignment.depth
        self.rewards = [r for r in REWARDS if r in o.rewards]
        self.layers, self.cut = layer_plan(o.layers, model.depth, depth)
        self.layer_notice = None
        if o.layers == "early" and self.layers == [depth]:  # shallow models: early is the default block
            self.layer_notice = (
                f"VRPO: objective.layers=early resolves to block {depth} at depth {model.depth}, "
                "the block that objective.layers=block uses: this run repeats the default placement"
            )
        if len(self.layers) == 1:  # early/mid move the aligned block: evaluations (RA) must read that one
            self.alignment.depth = self.layers[0]
        self.grad_block = max(self.layers)  # where gradient shares are measured
        # mid: the reward branch is a second pass cut at block `cut` (the main pass keeps its graph)
        self.second_pass = o.pathwise and self.cut > 0
        encoders = self.alignment.encoders
        if "fidelity" in self.rewards and o.fidelity == "full":
            rows = micro_batch(cfg) * (o.group_size if o.group_batch == "images" else 1)
            for e in encoders:
                if rows <= e.token_dim:
                    raise ConfigError(
                        f"objective.fidelity=full needs more rows per rank ({rows}) than {e.name}'s "
                        f"feature dimension {e.token_dim}: use fidelity=diagonal or a larger batch"
                    )
        # per_block: block 1 keeps the alignment projectors, the others get their own
        self.block_projectors = None
        if o.layer_projectors == "per_block":
            self.block_projectors = nn.ModuleList(
                nn.ModuleList(build_projector(o, model, e.token_dim) for e in encoders) for _ in self.layers[1:]
            )
        self.global_heads = None
        if "semantic" in self.rewards and o.semantic != "patch":
            self.global_heads = nn.ModuleList(
                nn.Linear(model.hidden_size, e.global_dim + e.token_dim) for e in encoders
            )
            for head in self.global_heads:  # the paper's appendix: initialised to identity
                nn.init.eye_(head.weight)
                nn.init.zeros_(head.bias)
        self.__dict__["lpips"] = load_lpips() if o.perceptual == "lpips" else None  # frozen, not checkpointed
        self.register_statistics(encoders)
        # v2: a group's draws share t (its advantage is relative within the group at one noise level)
        self.time_groups = o.group_size if o.advantage_baseline == "timestep" else 1
        self.share_names = ["denoise", "align", *self.rewards]
        self.register_buffer("grad_share", torch.zeros(len(self.share_names)))  # last measurement, logged every step
        self._pending_shares: list[torch.Tensor] = []  # this step's measurements, one per micro-batch

    def hidden_layers(self) -> tuple[int, ...]:
        return () if self.second_pass else tuple(self.layers)

    def end_of_step(self, step: int, applied: bool) -> None:
        shares, self._pending_shares = self._pending_shares, []
        if shares:  # the global batch's: the mean over micro-batches and ranks, as the statistics
            self.grad_share.copy_(all_reduce_mean(torch.stack(shares).mean(0)))
        super().end_of_step(step, applied)

    # ------------------------------------------------------------ the loss

    def loss(self, model, batch: Batch, generator: torch.Generator) -> LossOutput:
        denoise, align, logs = self.terms(model, batch, generator)
        return LossOutput(denoise + align, logs)

    def terms(self, model, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(L_denoise weighted by the policy, L_align from the pathwise rewards, logs); the loss is their sum."""
        o = self.options
        batch, images = self.grouped(batch)
        outputs = self.alignment.encoder_outputs(images)
        g = batch.x.shape[0] // images.x.shape[0]
        token = repeat_rows(outputs[0][1], g) if o.global_token else None  # REG's token, per row
        step = self.denoise(model, batch, generator, time_groups=self.time_groups, global_token=token)
        rewards, real = self.reward_components(model, batch, step, outputs, g)
        w = self.weights()
        samples = torch.stack([rewards[k].sample.detach().double() for k in self.rewards])
        batch_values = torch.stack([rewards[k].batch for k in self.rewards])
        total = (w[:, None] * samples).sum(0)  # R_i, no gradient
        m_R, v_R = self.total_stats(w, total)
        prior = o.lambda_variance == "prior"  # lambda from R under the prior weights: w cannot move it
        lam = self.lambda_s(self.prior_variance((self.prior_weights()[:, None] * samples).sum(0)) if prior else v_R)
        scale = lam / v_R.sqrt() if o.standardize_pathwise and o.normalize else lam
        scale = scale * o.alignment_scale(self.step)  # the alignment schedule (1 unless one is set)
        reward_terms = (-scale * w).float() * batch_values.float()  # each component's pathwise term
        align = reward_terms.sum()
        if o.standardize_pathwise and o.normalize:  # centre with the running mean (a constant: value only)
            stats = self.reward_stats()
            centre = w @ stats[0] if stats is not None else w @ batch_values.detach().double()
            align = align + (scale * centre).float()
        t = self.noising.fraction(step.t)
        bins = (t * self.bins).long().clamp(0, self.bins - 1) if self.bins else None
        baseline = self.timestep_baseline(bins, m_R, v_R) if self.bins else (m_R, v_R)
        advantage = advantages(total, *baseline, o)
        a = policy_weights(advantage, o) if o.policy else torch.ones_like(advantage)
        denoise = (a.detach() * step.per_sample_loss).mean() if o.policy else step.per_sample_loss.mean()
        token_loss = o.global_weight * step.global_loss.mean() if o.global_token else 0.0
        if torch.is_grad_enabled():  # a training pass (not an evaluation under no_grad)
            self.record(batch_values, samples, total, real, bins)
            if o.grad_share_every and self.counts()["steps"] % o.grad_share_every == 0:
                self._pending_shares.append(gradient_shares(model.blocks[self.grad_block - 1], denoise, reward_terms))
        logs = {
            **step.logs(),
            "loss_denoise": denoise.detach(),
            "loss_align": align.detach(),
            "lambda_s": lam,
            "loss_denoise_unweighted": step.per_sample_loss.mean().detach(),  # comparable with SiT's and REPA's
            "R_mean": total.mean().float(),
            "R_var": v_R.float(),
            **self.policy_logs(advantage, a, t),
            **self.reward_logs(batch_values, w, scale),
        }
        return denoise + token_loss, align, logs

    def reward_components(self, model, batch: Batch, step: DenoisingStep, outputs: list, g: int):
        """({reward: Reward} averaged over the rewarded blocks, real features for the fidelity statistics),
        from the encoder ``outputs`` of the distinct images, each the first of ``g`` rows in a row."""
        on_grid = self.alignment.on_model_grid(outputs)  # every reward uses the same resampled targets
        targets = [repeat_rows(y, g) for y in on_grid]
        globals_ = []
        if self.global_heads is not None:  # concat(CLS, mean patch token), for semantic: global/both
            globals_ = [repeat_rows(torch.cat([glob, tokens.mean(1)], -1), g) for tokens, glob in outputs]
        real = [y.mean(dim=1) for y in on_grid] if "fidelity" in self.rewards else []
        reference = self.reference(real) if real else []
        hidden = self.reward_hidden(model, step)
        after = self.stability_targets(model, batch, step) if "stability" in self.rewards else {}
        per_layer = [
            self.layer_rewards(p, hidden[i], after.get(i), targets, globals_, reference)
            for p, i in enumerate(self.layers)
        ]
        rewards = {k: Reward(*(torch.stack(v).mean(0) for v in zip(*(r[k] for r in per_layer)))) for k in self.rewards}
        if self.lpips is not None:
            extra = perceptual_reward(self.lpips, batch.x, step.x_t, step.t, step.prediction)
            fid = rewards["fidelity"]
            rewards["fidelity"] = Reward(fid.sample + extra, fid.batch + extra.mean())
        return rewards, real

    def layer_rewards(self, position: int, hidden, after, targets, globals_, reference) -> dict[str, Reward]:
        o, out = self.options, {}
        patch = "semantic" in self.rewards and o.semantic != "global"
        # one pass over each encoder's projection for the three rewards (objectives/cosine.py)
        parts = [
            projection_rewards(
                z,
                y if patch else None,
                after[e] if after is not None else None,
                centre=o.stability_centering,  # v2: centred per token position, no constant optimum
                pooled="fidelity" in self.rewards,
            )
            for e, (z, y) in enumerate(zip(self.project_layer(hidden, position), targets))
        ]
        semantic, stability, pooled = zip(*parts)
        if "semantic" in self.rewards:
            means = [torch.stack(semantic).mean(0)] if patch else []
            if o.semantic != "patch":
                means.append(global_cosine(self.global_heads, hidden, globals_))
            r = means[0] if len(means) == 1 else torch.stack(means).mean(0)
            out["semantic"] = Reward(r, r.mean())
        if "stability" in self.rewards:
            r = torch.stack(stability).mean(0)
            # rows outside the stability subset take its mean (advantages need every row)
            out["stability"] = Reward(torch.cat([r, r.detach().mean().expand(hidden.shape[0] - r.shape[0])]), r.mean())
        if "fidelity" in self.rewards:
            out["fidelity"] = fidelity_reward(list(pooled), reference, o)
        return out

    def policy_logs(self, advantage: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> dict:
        return {
            "pw_t_corr": correlation(a, t),  # a timestep weighting hidden in the policy weights shows here
            "adv_mean": advantage.mean(),
            "adv_std": advantage.std(unbiased=False),
            "adv_min": advantage.min(),
            "adv_max": advantage.max(),
            "pw_min": a.min().detach(),
            "pw_max": a.max().detach(),
        }

    def reward_logs(self, batch_values: torch.Tensor, w: torch.Tensor, scale) -> dict:
        logs, stats = {}, self.reward_stats()
        coefficients = (scale * w).float()  # what multiplies each reward in L_align (v2: lambda_s w_k)
        for j, k in enumerate(self.rewards):
            logs[f"coef_{k}"] = coefficients[j]
            logs[f"r_{k}"] = batch_values[j].detach()
            logs[f"r_{k}_var"] = stats[1][j].float() if stats is not None else 0.0
            logs[f"w_{k}"] = w[j].float()
        if self.options.grad_share_every:
            logs.update({f"gshare_{n}": v for n, v in zip(self.share_names, self.grad_share)})
        return logs

    # ------------------------------------------------------------ passes

    def grouped(self, batch: Batch) -> tuple[Batch, Batch]:
        """(rows the network sees: each image G times in a row, the distinct images)."""
        g = self.options.group_size
        if g == 1:
            return batch, batch

        def rows(b: Batch, fn) -> Batch:
            return Batch(
                **{f.name: None if getattr(b, f.name) is None else fn(getattr(b, f.name)) for f in fields(Batch)}
            )

        n = batch.x.shape[0]
        if self.options.group_batch == "draws":
            if n % g:
                raise RuntimeError(f"objective.group_size {g} does not divide this micro-batch of {n} images")
            batch = rows(batch, lambda v: v[: n // g])
        return rows(batch, lambda v: repeat_rows(v, g)), batch

    def project_layer(self, hidden: torch.Tensor, position: int) -> list[torch.Tensor]:
        heads = None if self.block_projectors is None or position == 0 else self.block_projectors[position - 1]
        return self.alignment.project(hidden, heads)

    def reward_hidden(self, model, step: DenoisingStep) -> dict[int, torch.Tensor]:
        if self.second_pass:  # mid: blocks cut+1..d only, on the same inputs
            out = model(
                step.x_t,
                step.model_t,
                step.labels,
                hidden_layers=self.layers,
                stop_after=max(self.layers),
                detach_after=self.cut,
                global_token=step.global_t,
            )
            return out.hidden
        if self.options.pathwise:
            return step.hidden
        return {i: h.detach() for i, h in step.hidden.items()}  # the rewards then train only the heads

    @torch.no_grad()
    def stability_targets(self, model, batch: Batch, step: DenoisingStep) -> dict[int, list[torch.Tensor]]:
        """stopgrad(phi(h_t')) at t' = t - delta (clamped at the data), SAME noise, blocks 1..max(layers) only."""
        rows = batch.x.shape[0]  # centring needs two samples to centre over
        n = min(rows, max(2 if self.options.stability_centering else 1, round(self.options.stability_fraction * rows)))
        t = self.noising.earlier(step.t[:n], self.options.delta)
        x_t = self.noising.add_noise(batch.x[:n], step.noise[:n], t)
        labels = None if step.labels is None else step.labels[:n]
        token = None  # REG's token at t' with its same noise
        if step.global_t is not None:
            token = self.noising.add_noise(step.global_token[:n], step.global_noise[:n], t)
        out = model(
            x_t,
            self.noising.model_time(t),
            labels,
            hidden_layers=self.layers,
            stop_after=max(self.layers),
            global_token=token,
        )
        return {i: self.project_layer(out.hidden[i], p) for p, i in enumerate(self.layers)}

    # ------------------------------------------------------------ hooks

    def warnings(self, record: dict[str, float]) -> dict[str, str]:
        found = {}
        if self.layer_notice:
            found["layers_is_block"] = self.layer_notice
        if self.options.weighting == "inverse_variance" and (message := dominant_weight(record, self.rewards)):
            found["dominant_weight"] = message
        return found

    def finalize(self, run_dir) -> list:
        plot = plot_vrpo(run_dir)
        return [plot] if plot else []
