"""Heads trained beside the network by alignment objectives."""

from __future__ import annotations

import torch.nn as nn


class Projector(nn.Module):
    """REPA's token-wise MLP: Linear(D, W)-SiLU-Linear(W, W)-SiLU-Linear(W, D_out)."""

    def __init__(self, in_dim: int, out_dim: int, width: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out_dim)
        )

    def forward(self, tokens):
        return self.net(tokens)
