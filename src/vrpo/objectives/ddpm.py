"""DiT's objective: DDPM with eps prediction and a learned variance (MSE + variational bound)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vrpo.objectives.base import Batch, LossOutput, Objective, ObjectiveOptions, drop_labels, randn_like
from vrpo.transport.ddpm import create_ddpm


@dataclass
class DDPMOptions(ObjectiveOptions):
    name: str = "ddpm"

    def validate(self, cfg) -> None:
        from vrpo.config import ConfigError

        if cfg.diffusion.schedule != "linear":
            raise ConfigError(f"diffusion.schedule {cfg.diffusion.schedule!r} is not available (linear)")


class DDPM(Objective):
    name = "ddpm"
    Options = DDPMOptions

    def __init__(self, options, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        self.diffusion = create_ddpm(num_steps=cfg.diffusion.num_steps)
        self.label_dropout = cfg.train.label_dropout
        self.null_class = model.null_class

    def loss(self, model, batch: Batch, generator: torch.Generator) -> LossOutput:
        x = batch.x
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=generator).to(x.device)
        noise = randn_like(x, generator)
        labels = drop_labels(batch.labels, self.label_dropout, self.null_class, generator)
        terms = self.diffusion.training_losses(lambda xt, tt: model(xt, tt, labels).prediction, x, t, noise)
        loss = terms["loss"].mean()
        return LossOutput(loss, {"loss_mse": terms["mse"].mean().detach(), "loss_vb": terms["vb"].mean().detach()})
