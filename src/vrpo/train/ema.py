"""Exponential moving average of the weights, with DiT-style warm-up of the decay."""

from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """Warm-up (1 + n) / (10 + n) keeps early averages from being mostly the initial weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    update_ema_tensors(list(ema.parameters()), list(model.parameters()), decay)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of a module's trainable parameters by name (an objective's heads), the start of their EMA."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def update_ema_tensors(averages: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    if averages:
        torch._foreach_lerp_(averages, [p.detach() for p in params], 1.0 - decay)
