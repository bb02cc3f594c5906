"""Heads trained beside the network by alignment objectives."""

from __future__ import annotations

import torch.nn as nn

PROJECTOR_INITS = ("default", "xavier")


class Projector(nn.Module):
    """REPA's token-wise MLP: Linear(D, W)-SiLU-Linear(W, W)-SiLU-Linear(W, D_out).

    ``init``: ``default`` keeps PyTorch's initialisation of the linears; ``xavier`` gives them
    xavier-uniform weights and zero biases, as the official REPA code (it initialises every linear so).
    """

    def __init__(self, in_dim: int, out_dim: int, width: int = 2048, init: str = "default"):
        super().__init__()
        if init not in PROJECTOR_INITS:
            raise ValueError(f"unknown projector initialisation {init!r} ({', '.join(PROJECTOR_INITS)})")
        self.net = nn.Sequential(
            nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out_dim)
        )
        if init == "xavier":
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, tokens):
        return self.net(tokens)
