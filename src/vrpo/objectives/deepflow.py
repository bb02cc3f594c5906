"""DeepFlow (Shin et al., ICCV 2025, "Deeply supervised flow-based generative models"): SiT's
blocks split evenly into branches (``model.branch_blocks``, set from ``objective.branches``), each
with a velocity head, and VeRA blocks between them (``vrpo.models.deepflow``).

Branch k is conditioned on its own time: t_0 = t, and t_{k+1} = t_k + s g_k, clamped to [0, 1],
with gaps g_k ~ U(0, gap_max) per sample and one sign s for the batch (the official code's). Every
head predicts the same velocity target from the same x_t (the linear path's velocity does not depend
on t). The loss is sum_k w_k ||v_k - (eps - x)||^2 plus ``acceleration_weight`` times, for every
branch but the last, ||x_{t_k} - t_k sg(v_k) + a_k t_k^2 / 2 - x||^2: the second-order step from
x_{t_k} to the data with the branch's velocity (no gradient) and VeRA's acceleration.
Recipe (DeepFlow-B/2, 2 branches): blocks 6 | 12, weights [0.2, 1.0], gap_max 0.01, weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vrpo.errors import ConfigError
from vrpo.models import SIZES, parse_arch
from vrpo.objectives.base import LossOutput, Objective, ObjectiveOptions


@dataclass
class DeepFlowOptions(ObjectiveOptions):
    name: str = "deepflow"
    families: ClassVar[tuple[str, ...]] = ("flow",)
    branches: int = 2
    branch_weights: list[float] = field(default_factory=lambda: [0.2, 1.0])  # per branch, the last is the output
    gap_max: float = 0.01  # beta: the largest time gap between consecutive branches
    acceleration_weight: float = 1.0

    def branch_ends(self, arch: str) -> list[int]:
        depth = SIZES[parse_arch(arch)[1]][1]
        return [round(depth * k / self.branches) for k in range(1, self.branches)]

    def model_defaults(self, arch: str) -> dict:
        return {"branch_blocks": self.branch_ends(arch)}

    def validate(self, cfg) -> None:
        super().validate(cfg)
        tr = cfg.transport
        if tr.interpolant != "linear" or tr.prediction != "velocity" or tr.time_direction != "noise_at_1":
            raise ConfigError("objective deepflow's acceleration step needs the linear interpolant predicting velocity")
        if self.branches < 2 or len(self.branch_weights) != self.branches:
            raise ConfigError(
                f"objective.branches must be >= 2 with one objective.branch_weights each, got {self.branches} and "
                f"{self.branch_weights}"
            )
        ends = self.branch_ends(cfg.model.arch)
        if list(cfg.model.branch_blocks) != ends:
            raise ConfigError(f"objective deepflow's {self.branches} branches end after blocks {ends}: "
                              f"model.branch_blocks must be {ends}, got {list(cfg.model.branch_blocks)}")  # fmt: skip
        if not 0.0 <= self.gap_max <= 1.0 or self.acceleration_weight < 0.0 or min(self.branch_weights) < 0.0:
            raise ConfigError("objective.gap_max must be in [0, 1]; acceleration_weight and branch_weights >= 0")


class DeepFlow(Objective):
    name = "deepflow"
    Options = DeepFlowOptions

    def loss(self, model, batch, generator) -> LossOutput:
        o, drawn = self.options, {}

        def branch_times(t: torch.Tensor, gen: torch.Generator) -> dict:
            sign = 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0
            times = [t]
            for _ in range(o.branches - 1):
                gap = torch.rand(t.shape[0], generator=gen).to(t.device) * o.gap_max
                times.append((times[-1] + sign * gap).clamp(0.0, 1.0))
            drawn["times"] = times
            return {"branch_times": [self.noising.model_time(s) for s in times]}

        step = self.denoise(model, batch, generator, extra_inputs=branch_times)
        out, times = step.output, drawn["times"]
        heads = [self.noising.from_network(p) for p in out.branch_predictions]
        losses = [self.noising.loss_terms(v, batch.x, step.noise, step.x_t, step.t)[0] for v in heads]
        losses.append(step.per_sample_loss)
        velocity = sum(w * loss.mean() for w, loss in zip(o.branch_weights, losses))
        acceleration = torch.zeros((), device=batch.x.device)
        for v, a, t in zip(heads, out.accelerations, times):
            s = t.view(-1, 1, 1, 1).to(v.dtype)
            x_t = self.noising.add_noise(batch.x, step.noise, t)
            landed = x_t - s * v.detach() + 0.5 * a * s**2
            acceleration = acceleration + (landed.float() - batch.x.float()).pow(2).flatten(1).mean(1).mean()
        loss = velocity + o.acceleration_weight * acceleration
        logs = {**step.logs(), "loss_denoise": losses[-1].mean().detach(), "loss_acceleration": acceleration.detach()}
        logs.update({f"loss_branch{k}": value.mean().detach() for k, value in enumerate(losses[:-1])})
        return LossOutput(loss, logs)
