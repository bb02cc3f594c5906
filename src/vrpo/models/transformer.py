"""SiT/DiT: a class-conditional diffusion transformer with adaLN-Zero blocks.

One network serves both families: SiT predicts a velocity (or noise/score) with
``learn_sigma=False``; DiT predicts noise and a variance interpolation with
``learn_sigma=True`` (2x output channels). Alignment methods read block outputs through
``forward(..., hidden_layers=...)``, which returns them in a ``ModelOutput``; blocks are
numbered 1..depth as in the REPA paper (``encoder_depth=d`` aligns the output of block d).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def per_token(v: torch.Tensor) -> torch.Tensor:
    """A conditioning vector [B, D] broadcast over the tokens; token-wise ones [B, N, D] (DDT) as they are."""
    return v.unsqueeze(1) if v.dim() == 2 else v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + per_token(scale)) + per_token(shift)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, [grid_h * grid_w, dim] (float32)."""
    if dim % 4:
        raise ValueError(f"position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):  # half the channels per axis
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar time, then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The attention logits q k^T / sqrt(d_head) [B, H, N, N] (HASTE aligns their softmax)."""
        b, n, d = x.shape
        q, k, _ = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q) @ self.k_norm(k).transpose(-2, -1) / math.sqrt(d // self.heads)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Transformer block whose norms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attention_logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """This block's attention logits for its input ``x`` (recomputed: the fused attention keeps none)."""
        shift1, scale1 = self.ada(cond).chunk(6, dim=-1)[:2]
        return self.attn.logits(modulate(self.norm1(x), shift1, scale1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + per_token(gate1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + per_token(gate2) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int, global_token_dim: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        # REG: the global token's prediction, read from the first position
        self.linear_global = None
        if global_token_dim:
            with torch.random.fork_rng(devices=[]):  # initialised last (reset_parameters), so the rest's draws stay
                self.linear_global = nn.Linear(dim, global_token_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(patch outputs, the global token's output or None)."""
        shift, scale = self.ada(cond).chunk(2, dim=-1)
        x = modulate(self.norm(x), shift, scale)
        if self.linear_global is None:
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_global(x[:, 0])


@dataclass
class ModelOutput:
    """Prediction (None when the pass stopped early) and the requested block outputs [B, N, D] of
    the patch tokens; with a global token (REG), its prediction [B, D_g] and block states [B, D]."""

    prediction: torch.Tensor | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    global_prediction: torch.Tensor | None = None
    hidden_global: dict[int, torch.Tensor] = field(default_factory=dict)
    condition: torch.Tensor | None = None  # DDT: the condition encoder's output [B, N, D] the decoder read
    branch_predictions: list[torch.Tensor] = field(default_factory=list)  # DeepFlow: each earlier branch's head
    accelerations: list[torch.Tensor] = field(default_factory=list)  # DeepFlow: VeRA's, one per earlier branch
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # requested blocks' logits [B, H, N, N]


class DiffusionTransformer(nn.Module):
    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 1,
        patch_size: int = 2,
        hidden_size: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        global_token_dim: int = 0,
        decoder_depth: int = 0,
        representation_channels: int = 0,
    ):
        """``global_token_dim`` > 0: the network also denoises one global token of that width (REG's
        encoder CLS token), embedded in front of the patch tokens with no position embedding.

        ``decoder_depth`` > 0 (DDT): the last blocks are a velocity decoder with its own patch
        embedding, modulated token-wise by the condition encoder's output (blocks 1..depth -
        decoder_depth) plus the time embedding; the final layer is modulated so too.

        ``representation_channels`` K > 0 (ReDi): the input and output carry K more channels after
        the image's (the encoder features' principal components), generated jointly with it."""
        super().__init__()
        if not 0 <= decoder_depth < depth:
            raise ValueError(f"decoder depth {decoder_depth} must leave at least one of the {depth} blocks to encode")
        if decoder_depth and global_token_dim:
            raise ValueError("a decoupled (DDT) network with a global token (REG) is not supported")
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.image_channels, self.representation_channels = in_channels, representation_channels
        in_channels = in_channels + representation_channels
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.hidden_size, self.depth, self.num_classes = hidden_size, depth, num_classes
        self.learn_sigma, self.global_token_dim, self.decoder_depth = learn_sigma, global_token_dim, decoder_depth
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.grid = input_size // patch_size
        self.checkpoint_activations = False  # train.activation_checkpointing

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, self.grid, self.grid)[None], persistent=False
        )
        self.t_embedder = TimestepEmbedder(hidden_size)
        # num_classes == 0: unconditional; the table then only holds the null class.
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, global_token_dim)
        self.decoder_embed = None  # DDT's decoder reads x_t through its own patch embedding
        if decoder_depth:
            with torch.random.fork_rng(devices=[]):  # initialised last, as REG's layers
                self.decoder_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # REG's embedding of the noised global token: a linear map, then a LayerNorm with affine weights
        self.global_embed = None
        if global_token_dim:
            with torch.random.fork_rng(devices=[]):  # as linear_global
                self.global_embed = nn.Sequential(
                    nn.Linear(global_token_dim, hidden_size), nn.LayerNorm(hidden_size, eps=1e-6)
                )
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def null_class(self) -> int:
        return self.y_embedder.null_class

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier linears, zeroed modulation and output (adaLN-Zero)."""
        extra = [] if self.global_embed is None else [self.global_embed[0], self.final_layer.linear_global]
        for module in self.modules():
            if isinstance(module, nn.Linear) and not any(module is e for e in extra):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final_layer.ada[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.decoder_embed is not None:  # last, so that the rest starts as the same seed's plain network
            w = self.decoder_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.decoder_embed.bias)
        if extra:  # REG's layers last, so that the rest starts as the same seed's plain network
            nn.init.xavier_uniform_(extra[0].weight)
            nn.init.zeros_(extra[0].bias)
            nn.init.zeros_(extra[1].weight)  # the global token's output starts at 0, as the patches'
            nn.init.zeros_(extra[1].bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b, p, c, g = tokens.shape[0], self.patch_size, self.out_channels, self.grid
        x = tokens.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, global_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens after patch and position embedding (the global token first), and the conditioning vector."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"model expects {self.in_channels} x {self.input_size} x {self.input_size} inputs, got "
                f"{tuple(x.shape[1:])}"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        if global_token is None and self.global_embed is not None:
            raise ValueError(f"this network denoises a global token of width {self.global_token_dim} (REG): pass one")
        if global_token is not None and self.global_embed is None:
            raise ValueError("this network has no global token (REG): global_token must be None")
        if global_token is not None:
            tokens = torch.cat([self.global_embed(global_token.to(tokens.dtype))[:, None], tokens], dim=1)
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
        return tokens, self.t_embedder(t) + self.y_embedder(y)

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
        after_block=None,
    ) -> ModelOutput:
        """Predict for noisy inputs ``x`` at times ``t`` (model units) and labels ``y``.

        ``hidden_layers``: 1-based block indices whose outputs are returned.
        ``stop_after``: run only blocks 1..stop_after and return no prediction (a cheap
        partial pass, e.g. VRPO's stability reward).
        ``detach_after``: cut the graph after block detach_after, so that what is computed
        from this pass's later blocks sends no gradient to the embeddings or blocks
        1..detach_after (e.g. a reward that must only train the middle blocks).
        ``global_token``: the noised global token [B, D_g] of a network with one (REG), else None.
        ``condition``: a DDT network's encoder output from an earlier call (``ModelOutput.condition``),
        reused instead of running the encoder (encoder sharing at sampling).
        ``attention_layers``: 1-based blocks whose attention logits are returned (``ModelOutput.attention``).
        ``after_block(index, tokens, cond, inputs)``: a subclass's hook after each block (its output
        recorded), returning the tokens and conditioning the next block reads; ``inputs`` are the
        embedded input tokens (DeepFlow's branches).
        """
        wanted = set(hidden_layers)
        if any(not 1 <= i <= self.depth for i in wanted):
            raise ValueError(f"hidden layers {sorted(wanted)} outside blocks 1..{self.depth}")
        last = self.depth if stop_after is None else stop_after
        encoder_blocks = self.depth - self.decoder_depth
        tokens, cond = self.embed(x, t, y, global_token)
        inputs = tokens
        first = 0 if global_token is None else 1  # where the patch tokens start
        hidden: dict[int, torch.Tensor] = {}
        hidden_global: dict[int, torch.Tensor] = {}
        attention: dict[int, torch.Tensor] = {}
        attend = set(attention_layers)
        start = 1
        if condition is not None:  # the shared encoder output: the decoder alone runs
            if not self.decoder_depth or stop_after is not None or wanted:
                raise ValueError("a reused condition feeds a DDT decoder's full pass, without hidden states")
            start = encoder_blocks + 1
        for index in range(start, last + 1):
            if index == encoder_blocks + 1 and self.decoder_depth:  # DDT: the encoder's output conditions
                if condition is None:
                    condition = tokens + self.t_embedder(t)[:, None]
                cond = condition
                tokens = self.decoder_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
            block = self.blocks[index - 1]
            if index in attend:
                attention[index] = block.attention_logits(tokens, cond)
            if self.checkpoint_activations and torch.is_grad_enabled():  # recomputed in backward: less memory
                tokens = checkpoint(block, tokens, cond, use_reentrant=False)
            else:
                tokens = block(tokens, cond)
            if index == detach_after:
                tokens = tokens.detach()
            if index in wanted:
                hidden[index] = tokens[:, first:]
                if first:
                    hidden_global[index] = tokens[:, 0]
            if after_block is not None:
                tokens, cond = after_block(index, tokens, cond, inputs)
        if stop_after is not None:
            return ModelOutput(None, hidden, hidden_global=hidden_global, attention=attention)
        patches, global_prediction = self.final_layer(tokens, cond)
        shared = condition if self.decoder_depth else None
        return ModelOutput(
            self.unpatchify(patches), hidden, global_prediction, hidden_global, shared, attention=attention
        )

    def forward_with_rg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, scale: float) -> ModelOutput:
        """ReDi's representation guidance: the image channels guided away from the pass whose
        representation channels are zeroed, v0 + scale (v - v0); the representation channels stay."""
        absent = x.clone()
        absent[:, self.image_channels :] = 0
        both = self.forward(torch.cat([x, absent]), torch.cat([t, t]), None if y is None else torch.cat([y, y]))
        present, without = both.prediction.chunk(2)
        c = self.image_channels
        return ModelOutput(torch.cat([without[:, :c] + scale * (present[:, :c] - without[:, :c]), present[:, c:]], 1))

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        scale: float,
        guide: torch.Tensor | None = None,
        global_token: torch.Tensor | None = None,
        global_scale: float | None = None,
        condition: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Classifier-free guidance on every prediction channel (learned-sigma channels stay conditional)
        and on the global token (at ``global_scale``, default ``scale``).

        ``guide`` (bool per sample) limits guidance to samples inside a guidance interval.
        ``condition``: DDT's shared encoder output for the doubled (conditional, then null) batch.
        """
        if scale == 1.0 and global_scale in (None, 1.0):
            return self.forward(x, t, y, global_token=global_token, condition=condition)
        null = torch.full_like(y, self.null_class)
        pair = None if global_token is None else torch.cat([global_token, global_token])
        both = self.forward(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), global_token=pair, condition=condition
        )

        def guided(out: torch.Tensor, s: float) -> torch.Tensor:
            cond, uncond = out.chunk(2)
            mixed = uncond + s * (cond - uncond)
            return mixed if guide is None else torch.where(guide.view(-1, *[1] * (out.dim() - 1)), mixed, cond)

        c = self.in_channels
        cond = both.prediction.chunk(2)[0]
        prediction = torch.cat([guided(both.prediction[:, :c], scale), cond[:, c:]], dim=1)
        token = None if global_token is None else guided(both.global_prediction, global_scale or scale)
        return ModelOutput(prediction, global_prediction=token, condition=both.condition)
