"""Heads trained beside the network by alignment objectives."""

from __future__ import annotations

import torch
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


class ConvProjector(nn.Module):
    """iREPA's projector: one k x k convolution over the token grid (no activation), so that each
    projected token also sees its neighbours. Tokens [B, g*g, D] in, [B, g*g, D_out] out."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], kernel: int = 3, init: str = "default"):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"the convolutional projector needs an odd kernel, got {kernel}")
        self.grid = grid
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2)
        if init == "xavier":  # as the official code's initialisation of every linear map
            nn.init.xavier_uniform_(self.conv.weight.view(out_dim, -1))
            nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        image = tokens.transpose(1, 2).reshape(b, d, *self.grid)
        return self.conv(image).flatten(2).transpose(1, 2)
