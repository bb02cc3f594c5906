"""The DINOv2 ViT (with and without registers), written here from scratch: config, presets and network.

Parameter names follow the official torch.hub checkpoints, so those files load strictly
(``vrpo.encoders.dinov2_weights``); ``vrpo.encoders.dinov2`` wraps the network as an encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HUB_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class DINOv2Config:
    """Architecture of a DINOv2 ViT (defaults: the hub models' shared settings)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    img_size: int = 518  # pos_embed holds (img_size // patch_size)**2 positions
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    swiglu: bool = False  # ViT-g uses a fused SwiGLU FFN (w12 / w3)
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    # Pos-embed interpolation as the hub builds each model: the original
    # models use a +0.1 scale offset, the register models an exact size with
    # antialiasing.
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.swiglu:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def arch(self) -> tuple:
        """The fields that decide parameter shapes and the computation."""
        return (
            self.embed_dim,
            self.depth,
            self.num_heads,
            self.patch_size,
            self.img_size,
            self.mlp_hidden,
            self.num_register_tokens,
            self.swiglu,
            self.qkv_bias,
        )


def _preset(dim: int, depth: int, heads: int, swiglu: bool = False, reg: bool = False) -> DINOv2Config:
    cfg = DINOv2Config(embed_dim=dim, depth=depth, num_heads=heads, swiglu=swiglu)
    if reg:
        cfg = replace(cfg, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    return cfg


_BASE_PRESETS = {
    "dinov2-vits14": (384, 12, 6, False),
    "dinov2-vitb14": (768, 12, 12, False),
    "dinov2-vitl14": (1024, 24, 16, False),
    "dinov2-vitg14": (1536, 40, 24, True),
}
DINOV2_PRESETS: dict[str, DINOv2Config] = {}
for _name, (_d, _l, _h, _sw) in _BASE_PRESETS.items():
    DINOV2_PRESETS[_name] = _preset(_d, _l, _h, _sw)
    DINOV2_PRESETS[_name + "_reg"] = _preset(_d, _l, _h, _sw, reg=True)


def hub_url(name: str) -> str:
    """Official checkpoint URL for a preset name, e.g. dinov2-vitb14_reg."""
    base = name.removesuffix("_reg").replace("dinov2-", "dinov2_")
    full = base + ("_reg4" if name.endswith("_reg") else "")
    return f"{_HUB_BASE_URL}/{base}/{full}_pretrain.pth"


# --------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------
class _PatchEmbed(nn.Module):
    def __init__(self, cfg: DINOv2Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)


class _Attention(nn.Module):
    def __init__(self, cfg: DINOv2Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def logits(self, x: Tensor) -> Tensor:
        """q k^T / sqrt(d_head) [B, H, N, N]: the attention before its softmax."""
        b, n, d = x.shape
        q, k, _ = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return q @ k.transpose(-2, -1) / (d // self.num_heads) ** 0.5


class _Mlp(nn.Module):
    def __init__(self, cfg: DINOv2Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    def __init__(self, cfg: DINOv2Config) -> None:
        super().__init__()
        self.w12 = nn.Linear(cfg.embed_dim, 2 * cfg.mlp_hidden)
        self.w3 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, cfg: DINOv2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = _Attention(cfg)
        self.ls1 = _LayerScale(cfg.embed_dim)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.mlp = _SwiGLU(cfg) if cfg.swiglu else _Mlp(cfg)
        self.ls2 = _LayerScale(cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 backbone; state-dict names match the official hub checkpoints."""

    def __init__(self, cfg: DINOv2Config) -> None:
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        d = cfg.embed_dim
        self.pos_grid = cfg.img_size // cfg.patch_size
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid**2, d))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        else:
            self.register_tokens = None
        # Only used for masked training upstream; kept so checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embeddings [1, 1 + h*w, D] for an h x w patch grid (bicubic)."""
        m = self.pos_grid
        if (h, w) == (m, m):
            return self.pos_embed
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        off = self.cfg.interpolate_offset
        if off:
            # The original models were trained with this scale-factor kludge;
            # reproducing it keeps features identical to the hub models.
            kw: dict[str, Any] = {"scale_factor": ((h + off) / m, (w + off) / m)}
        else:
            kw = {"size": (h, w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.cfg.interpolate_antialias, **kw)
        if tuple(patch_pos.shape[-2:]) != (h, w):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward_features(self, x: Tensor, attention_blocks=()) -> dict[str, Tensor]:
        """Normalised image -> dict with x_norm_clstoken / x_norm_patchtokens (hub naming); with
        ``attention_blocks`` (1-based), also "attention": {block: patch-to-patch logits [B, H, N, N]}."""
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        fmap = self.patch_embed.proj(x)
        h, w = fmap.shape[-2:]
        tok = fmap.flatten(2).transpose(1, 2)
        tok = torch.cat([self.cls_token.expand(tok.shape[0], -1, -1), tok], dim=1)
        tok = tok + self.interpolate_pos_embed(h, w)
        r = self.cfg.num_register_tokens
        if r:
            # Registers go after CLS and carry no position embedding.
            tok = torch.cat([tok[:, :1], self.register_tokens.expand(tok.shape[0], -1, -1), tok[:, 1:]], dim=1)
        attention = {}
        for index, blk in enumerate(self.blocks, start=1):
            if index in attention_blocks:  # CLS and registers left out: the patches attend to the patches
                attention[index] = blk.attn.logits(blk.norm1(tok))[:, :, 1 + r :, 1 + r :]
            tok = blk(tok)
        tok = self.norm(tok)
        return {
            "x_norm_clstoken": tok[:, 0],
            "x_norm_regtokens": tok[:, 1 : 1 + r],
            "x_norm_patchtokens": tok[:, 1 + r :],
            "grid": (h, w),
            "attention": attention,
        }
