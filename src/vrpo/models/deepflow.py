"""DeepFlow's network (Shin et al., ICCV 2025): SiT's blocks split into branches, a velocity head
after each branch (deep supervision), and a VeRA block between branches.

Branch k ends after block ``branch_blocks[k]`` and is conditioned on its own time t_k. Its state
goes to the intermediate velocity head; the VeRA block then predicts an acceleration from it (an
MLP, read out by its own head), refines the velocity features with the time gap t_{k+1} - t_k
(an adaLN-modulated MLP over [velocity, acceleration]), and lets the patchified input attend to
them (cross-space attention); that is the next branch's input. At sampling every t_k is t and
the prediction is the last branch's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from vrpo.models.transformer import DiffusionTransformer, FinalLayer, ModelOutput, TimestepEmbedder, modulate


class VelocityRefiner(nn.Module):
    """VeRA: acceleration from the velocity features, refinement by the time gap, cross-space attention."""

    def __init__(self, dim: int, heads: int, acceleration_width: int):
        super().__init__()
        w = acceleration_width
        self.acceleration = nn.Sequential(
            nn.Linear(dim, w),
            nn.SiLU(),
            nn.Linear(w, 2 * w),
            nn.SiLU(),
            nn.Linear(2 * w, w),
            nn.SiLU(),
            nn.Linear(w, dim),
        )
        self.norm = nn.LayerNorm(2 * dim, elementwise_affine=False, eps=1e-6)
        self.gap_ada = nn.Sequential(nn.SiLU(), nn.Linear(2 * dim, 4 * dim))  # from the time gap's embedding
        self.refine = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.cross_norm = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, velocity: torch.Tensor, inputs: torch.Tensor, gap: torch.Tensor):
        """(acceleration features, the next branch's input tokens)."""
        acceleration = self.acceleration(velocity)
        shift, scale = self.gap_ada(gap).chunk(2, dim=-1)
        refined = self.refine(modulate(self.norm(torch.cat([velocity, acceleration], -1)), shift, scale.clamp(-5, 5)))
        query, kv = self.cross_norm(inputs), self.cross_norm(refined)
        return acceleration, query + self.cross(query, kv, kv, need_weights=False)[0]


class DeepFlowTransformer(DiffusionTransformer):
    def __init__(self, *args, branch_blocks: Iterable[int] = (), acceleration_width: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.branch_blocks = tuple(sorted(branch_blocks))
        if not self.branch_blocks or not all(1 <= b < self.depth for b in self.branch_blocks):
            raise ValueError(
                f"DeepFlow's branches must end inside blocks 1..{self.depth - 1}, got {self.branch_blocks}"
            )
        if len(set(self.branch_blocks)) != len(self.branch_blocks) or self.decoder_depth or self.global_token_dim:
            raise ValueError("DeepFlow needs distinct branch ends and neither a DDT decoder nor a REG token")
        d, heads = self.hidden_size, self.blocks[0].attn.heads
        with torch.random.fork_rng(devices=[]):  # initialised from the main RNG after the rest (as REG's layers)
            self.gap_embedder = TimestepEmbedder(2 * d)
            self.refiners = nn.ModuleList(
                VelocityRefiner(d, heads, acceleration_width or 2 * d) for _ in self.branch_blocks
            )
            self.branch_head = FinalLayer(d, self.patch_size, self.out_channels)  # shared by the branches
            self.acceleration_head = FinalLayer(d, self.patch_size, self.out_channels)
        self.reset_branches()

    def reset_branches(self) -> None:
        """DeepFlow's initialisation: Xavier linears; zeroed heads and time-gap modulation."""
        for module in (self.gap_embedder, self.refiners, self.branch_head, self.acceleration_head):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        for refiner in self.refiners:
            nn.init.xavier_uniform_(refiner.cross.in_proj_weight)
            nn.init.zeros_(refiner.cross.in_proj_bias)
            nn.init.zeros_(refiner.gap_ada[-1].weight)
            nn.init.zeros_(refiner.gap_ada[-1].bias)
        nn.init.normal_(self.gap_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.gap_embedder.mlp[2].weight, std=0.02)
        for head in (self.branch_head, self.acceleration_head):
            for layer in (head.ada[-1], head.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        hidden_layers: Iterable[int] = (),
        stop_after: int | None = None,
        detach_after: int | None = None,
        global_token: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        attention_layers: Iterable[int] = (),
        branch_times: list[torch.Tensor] | None = None,
    ) -> ModelOutput:
        """As SiT's, plus ``branch_times``: one time per branch (model units; default t for each).
        The output's ``branch_predictions`` and ``accelerations`` hold the heads of every branch but
        the last, whose prediction is ``prediction``."""
        if global_token is not None or condition is not None:
            raise ValueError("DeepFlow's network takes no global token and no shared condition")
        times = branch_times or [t] * (len(self.branch_blocks) + 1)
        if len(times) != len(self.branch_blocks) + 1:
            raise ValueError(f"DeepFlow takes {len(self.branch_blocks) + 1} branch times, got {len(times)}")
        null = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
        labels = self.y_embedder(null if y is None else y)  # each branch adds its own time to it
        branch, accelerations = [], []

        def between_branches(index, tokens, cond, inputs):
            if index not in self.branch_blocks:
                return tokens, cond
            k = self.branch_blocks.index(index)
            branch.append(self.unpatchify(self.branch_head(tokens, cond)[0]))
            acceleration, tokens = self.refiners[k](tokens, inputs, self.gap_embedder(times[k + 1] - times[k]))
            accelerations.append(self.unpatchify(self.acceleration_head(acceleration, cond)[0]))
            return tokens, self.t_embedder(times[k + 1]) + labels

        out = super().forward(
            x,
            times[0],
            y,
            hidden_layers,
            stop_after,
            detach_after,
            attention_layers=attention_layers,
            after_block=None if stop_after is not None else between_branches,
        )
        out.branch_predictions, out.accelerations = branch, accelerations
        return out
