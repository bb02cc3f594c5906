"""SiT: flow matching on an interpolant, the base of every alignment method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vrpo.objectives.base import Batch, LossOutput, Objective, ObjectiveOptions, drop_labels, randn_like
from vrpo.transport.interpolants import build_interpolant, sample_timesteps


@dataclass
class DenoisingStep:
    """One noised batch and the network's pass over it, shared by the methods built on SiT."""

    t: torch.Tensor  # [B] interpolant time
    noise: torch.Tensor
    x_t: torch.Tensor
    labels: torch.Tensor | None  # after label dropout
    prediction: torch.Tensor
    hidden: dict[int, torch.Tensor]
    per_sample_loss: torch.Tensor  # [B] mean squared error per sample


@dataclass
class SiTOptions(ObjectiveOptions):
    name: str = "sit"


class SiT(Objective):
    name = "sit"
    Options = SiTOptions

    def __init__(self, options, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        self.transport = cfg.transport
        self.interpolant = build_interpolant(cfg.transport.interpolant)
        self.label_dropout = cfg.train.label_dropout
        self.null_class = model.null_class

    def hidden_layers(self) -> tuple[int, ...]:
        """Blocks whose outputs this method reads (1-based)."""
        return ()

    def sample_times(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        tr = self.transport
        t = sample_timesteps(n, generator, tr.timesteps, tr.t_min, tr.t_max, tr.logit_mean, tr.logit_std)
        return t.to(device)

    def denoise(self, model, batch: Batch, generator: torch.Generator) -> DenoisingStep:
        # Draw order (t, noise, label dropout) is fixed so that every method sees the same draws.
        x = batch.x
        t = self.sample_times(x.shape[0], generator, x.device)
        noise = randn_like(x, generator)
        labels = drop_labels(batch.labels, self.label_dropout, self.null_class, generator)
        x_t = self.interpolant.sample(x, noise, t)
        target = self.interpolant.target(self.transport.prediction, x, noise, t)
        out = model(x_t, t * self.transport.time_scale, labels, hidden_layers=self.hidden_layers())
        per_sample = (out.prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        return DenoisingStep(t, noise, x_t, labels, out.prediction, out.hidden, per_sample)

    def loss(self, model, batch: Batch, generator: torch.Generator) -> LossOutput:
        step = self.denoise(model, batch, generator)
        loss = step.per_sample_loss.mean()
        return LossOutput(loss, {"loss_denoise": loss.detach()})
