"""SRA (Jiang et al. 2025): the network's own representation guides it. An early block of the
network at time t, through a head Linear(D, 2D)-SiLU-Linear(2D, D), is aligned to a later block
of the EMA network (no gradient) at a less noisy time t' = t - delta, delta ~ U(0, t_max), from
the same data and noise and the same (dropped) labels. No encoder. Recipe (official code,
SiT-XL/2): block 8 to the EMA's block 20 of 28, t_max 0.2, weight 0.5, cosine loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vrpo.errors import ConfigError
from vrpo.models import SIZES, parse_arch
from vrpo.objectives.base import LossOutput, Objective
from vrpo.objectives.cosine import token_cosine
from vrpo.objectives.layersync import scaled_block
from vrpo.objectives.schedules import ScheduledOptions


@dataclass
class SRAOptions(ScheduledOptions):
    name: str = "sra"
    source_block: int = 0  # the student's block; 0: round(8/28 x depth)
    target_block: int = 0  # the EMA teacher's block; 0: round(20/28 x depth)
    t_max: float = 0.2  # the teacher's time is t - U(0, t_max) (a fraction of the range), clamped at the data
    weight: float = 0.5
    loss: str = "cosine"  # cosine (per token) or smooth_l1 (beta 0.05: the paper's)

    def blocks(self, depth: int) -> tuple[int, int]:
        return scaled_block(self.source_block, 8 / 28, depth), scaled_block(self.target_block, 20 / 28, depth)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        depth = SIZES[parse_arch(cfg.model.arch)[1]][1]
        source, target = self.blocks(depth)
        if not (1 <= source <= depth and 1 <= target <= depth):
            raise ConfigError(f"objective.source_block {source} and target_block {target} must lie in 1..{depth}")
        if not 0.0 <= self.t_max <= 1.0 or self.weight < 0.0:
            raise ConfigError(f"objective.t_max must be in [0, 1] and weight >= 0, got {self.t_max}, {self.weight}")
        if self.loss not in ("cosine", "smooth_l1"):
            raise ConfigError(f"objective.loss must be cosine or smooth_l1, got {self.loss!r}")

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        return {"self": self.weight * self.logged_scale(record)}


class SRA(Objective):
    name = "sra"
    Options = SRAOptions

    def __init__(self, options: SRAOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        self.source, self.target = options.blocks(model.depth)
        width = model.hidden_size
        self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        for layer in (self.head[0], self.head[2]):  # the official initialisation
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.__dict__["teacher"] = None  # the loop's EMA network, out of the module tree

    def bind_ema(self, ema: nn.Module) -> None:
        self.__dict__["teacher"] = ema

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.source,)

    def loss(self, model, batch, generator) -> LossOutput:
        if self.teacher is None:
            raise RuntimeError("SRA's teacher is the EMA network: bind it first (objective.bind_ema, the loop does)")
        step = self.denoise(model, batch, generator)
        denoise = step.per_sample_loss.mean()
        delta = self.options.t_max * torch.rand(step.t.shape[0], generator=generator).to(step.t.device)
        t_teacher = self.noising.earlier(step.t, delta)
        with torch.no_grad():
            x_teacher = self.noising.add_noise(batch.x, step.noise, t_teacher)
            hidden = self.teacher(
                x_teacher, self.noising.model_time(t_teacher), step.labels, hidden_layers=(self.target,),
                stop_after=self.target,
            ).hidden[self.target]  # fmt: skip
        student = self.head(step.hidden[self.source])
        if self.options.loss == "cosine":
            align = 1.0 - token_cosine(student, hidden).mean()
        else:
            align = F.smooth_l1_loss(student.float(), hidden.float(), beta=0.05)
        weight = self.options.weight * self.options.alignment_scale(self.step)
        loss = denoise + weight * align if weight else denoise
        return LossOutput(loss, {**step.logs(), "loss_denoise": denoise.detach(), "loss_align": align.detach()})
