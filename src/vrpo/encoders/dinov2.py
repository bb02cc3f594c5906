"""DINOv2 ViT encoders (with and without registers), written here from scratch.

Parameter names follow the official torch.hub checkpoints
(``dinov2_vitb14_pretrain.pth`` and friends), so those files load strictly.
Transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` directories are
mapped onto the same names.

Preprocessing (as REPA): uint8 -> /255 -> bilinear (antialiased) resize to
224 * resolution / 256 (rounded to a multiple of 14; 224 for the default
resolution 256) -> grayscale replicated to RGB -> ImageNet mean/std.
Targets: final-LayerNorm patch tokens (``x_norm_patchtokens``); global: the
normed CLS token.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EncoderOutput, FrozenEncoder, resize_spec

__all__ = [
    "DINOV2_PRESETS",
    "DINOv2Config",
    "DinoVisionTransformer",
    "DINOv2Encoder",
    "load_dinov2_weights",
    "hf_to_hub_state_dict",
    "config_from_hf",
    "hub_url",
]

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
        return (self.embed_dim, self.depth, self.num_heads, self.patch_size, self.img_size,
                self.mlp_hidden, self.num_register_tokens, self.swiglu, self.qkv_bias)


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

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Normalised image -> dict with x_norm_clstoken / x_norm_patchtokens (hub naming)."""
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
        for blk in self.blocks:
            tok = blk(tok)
        tok = self.norm(tok)
        return {
            "x_norm_clstoken": tok[:, 0],
            "x_norm_regtokens": tok[:, 1 : 1 + r],
            "x_norm_patchtokens": tok[:, 1 + r :],
            "grid": (h, w),
        }


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------
_HF_PREFIXES = ("dinov2.", "dinov2_with_registers.")
_HF_SIMPLE = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
}
_HF_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
_QKV = ("query", "key", "value")


def _strip_hf_prefix(key: str) -> str:
    for pre in _HF_PREFIXES:
        if key.startswith(pre):
            return key[len(pre):]
    return key


def _is_hf_naming(sd: Mapping[str, Tensor]) -> bool:
    return any(_strip_hf_prefix(k).startswith(("embeddings.", "encoder.layer.")) for k in sd)


def hf_to_hub_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a transformers Dinov2 state dict to hub names (q/k/v fused into qkv).

    Keys that do not map are kept as they are, so strict loading names them.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, val in sd.items():
        k = _strip_hf_prefix(key)
        if k in _HF_SIMPLE:
            out[_HF_SIMPLE[k]] = val
            continue
        m = _HF_LAYER_RE.match(k)
        if m is None:
            out[key] = val
            continue
        i, mid, leaf = m.groups()
        if mid.startswith("attention.attention.") and mid.rsplit(".", 1)[-1] in _QKV and leaf:
            qkv.setdefault((i, leaf), {})[mid.rsplit(".", 1)[-1]] = val
        elif mid in _HF_LAYER:
            out[f"blocks.{i}.{_HF_LAYER[mid]}" + (f".{leaf}" if leaf else "")] = val
        else:
            out[key] = val
    for (i, leaf), parts in qkv.items():
        if set(parts) == set(_QKV):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[n] for n in _QKV], dim=0)
        else:  # keep the incomplete pieces so the error names them
            for n, v in parts.items():
                out[f"encoder.layer.{i}.attention.attention.{n}.{leaf}"] = v
    return out


def config_from_hf(cfg: Mapping[str, Any]) -> DINOv2Config:
    """DINOv2Config from a transformers ``config.json`` (Dinov2 / Dinov2WithRegisters)."""
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported hidden_act {act!r} in config.json (DINOv2 uses gelu)")
    if int(cfg.get("num_channels", 3)) != 3:
        raise ValueError(f"unsupported num_channels {cfg['num_channels']} in config.json (expected 3)")
    regs = int(cfg.get("num_register_tokens", 0) or 0)
    base = DINOv2Config(
        embed_dim=int(cfg["hidden_size"]),
        depth=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        patch_size=int(cfg.get("patch_size", 14)),
        img_size=int(cfg.get("image_size", 518)),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        swiglu=bool(cfg.get("use_swiglu_ffn", False)),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        ln_eps=float(cfg.get("layer_norm_eps", 1e-6)),
    )
    if regs:
        base = replace(base, num_register_tokens=regs, interpolate_offset=0.0, interpolate_antialias=True)
    return base


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    # Training checkpoints sometimes nest the weights one level down.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _load_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)


def _load_hf_dir(path: Path) -> tuple[dict[str, Tensor], DINOv2Config]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is a directory but has no config.json (expected a transformers Dinov2Model directory)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return _load_file(path / single), cfg
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for shard in shards:
                sd.update(_load_file(path / shard))
            return sd, cfg
    raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin (or their .index.json shards)")


def load_dinov2_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], DINOv2Config | None]:
    """Read DINOv2 weights from disk, returned in hub naming.

    ``path`` is a hub-style state-dict file (.pth/.pt/.bin via
    ``torch.load(weights_only=True)``, or .safetensors) or a transformers
    model directory. The config is returned only for directories.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        sd, cfg = _load_hf_dir(p)
    elif p.is_file():
        sd, cfg = _load_file(p), None
    else:
        raise FileNotFoundError(f"DINOv2 weights not found: {p}")
    if _is_hf_naming(sd):
        sd = hf_to_hub_state_dict(sd)
    return sd, cfg


def _short(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _summary(sd: Mapping[str, Tensor]) -> str:
    """Rough architecture of a hub-named state dict, to explain mismatches."""
    dim = sd["cls_token"].shape[-1] if "cls_token" in sd else "?"
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return f"embed {dim}, {depth} blocks, {regs} registers"


def _load_strict(vit: DinoVisionTransformer, sd: Mapping[str, Tensor], source: str) -> None:
    own = vit.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad:
        parts = [f"file: {_summary(sd)}; model: {_summary(own)}"]
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if bad:
            parts.append(f"wrong shapes (file vs model): {_short(bad, 4)}")
        raise ValueError(f"DINOv2 weights from {source} do not match the architecture ({'; '.join(parts)})")
    vit.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True, assign=True)


def _from_hub(name: str) -> dict[str, Tensor]:
    # The hub entry points download exactly this file and load it into the
    # same architecture; fetching the state dict alone runs no remote code
    # and reuses the hub cache (~/.cache/torch/hub/checkpoints) when offline.
    url = hub_url(name)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except Exception as e:  # network errors come in many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(
            f"could not download {name} weights from {url} ({type(e).__name__}: {reason}); "
            f"offline, pass weights=<local .pth/.safetensors file or transformers model directory>"
        ) from None


# --------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------
def _custom_name(cfg: DINOv2Config) -> str:
    for name, preset in DINOV2_PRESETS.items():
        if preset.arch() == cfg.arch():
            return name
    reg = f"_reg{cfg.num_register_tokens}" if cfg.num_register_tokens else ""
    return f"dinov2-custom-d{cfg.embed_dim}-l{cfg.depth}-h{cfg.num_heads}-p{cfg.patch_size}{reg}"


def input_size_for(resolution: int, patch_size: int = 14) -> int:
    """REPA's rule: 224 px per 256 px of generation resolution, on the patch lattice."""
    return patch_size * max(1, round(224 * resolution / 256 / patch_size))


class DINOv2Encoder(FrozenEncoder):
    """Frozen DINOv2 encoder.

    Args:
        name: a preset (``dinov2-vit{s,b,l,g}14`` with optional ``_reg``);
            may be None when ``config`` is given or ``weights`` is a
            transformers directory (its config.json then decides).
        weights: local path (hub-style .pth/.safetensors file, or a
            transformers directory), an in-memory state dict (hub or HF
            naming), or None to download the official checkpoint via torch.hub.
        resolution: generation resolution for the 224 * resolution / 256 rule.
        input_size: explicit side length in pixels (multiple of the patch
            size); overrides ``resolution``.
        config: explicit architecture (e.g. tiny test models).
    """

    def __init__(
        self,
        name: str | None = None,
        weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
        resolution: int = 256,
        input_size: int | None = None,
        config: DINOv2Config | None = None,
    ) -> None:
        super().__init__()
        if name is not None and name not in DINOV2_PRESETS:
            raise ValueError(f"unknown DINOv2 model {name!r}; valid names: {', '.join(DINOV2_PRESETS)}")

        sd: Mapping[str, Tensor] | None = None
        file_cfg: DINOv2Config | None = None
        if isinstance(weights, Mapping):
            # Copies: the weights are assigned, not copied, into the model below.
            sd = {k: v.detach().clone() for k, v in weights.items()}
            sd = hf_to_hub_state_dict(sd) if _is_hf_naming(sd) else sd
            source = "the given state dict"
        elif weights is not None:
            sd, file_cfg = load_dinov2_weights(weights)
            source = str(weights)

        cfg = config or file_cfg or (DINOV2_PRESETS[name] if name else None)
        if cfg is None:
            raise ValueError("DINOv2Encoder needs a preset name, a config, or a transformers directory as weights")
        if name is not None and cfg.arch() != DINOV2_PRESETS[name].arch():
            pre = DINOV2_PRESETS[name]
            raise ValueError(
                f"{source if weights is not None else 'config'} describes embed {cfg.embed_dim}/depth {cfg.depth}/"
                f"heads {cfg.num_heads}/registers {cfg.num_register_tokens}, but {name} is embed {pre.embed_dim}/"
                f"depth {pre.depth}/heads {pre.num_heads}/registers {pre.num_register_tokens}"
            )

        self.config = cfg
        self.name = name or _custom_name(cfg)
        # Built on the meta device and filled by assignment: no throw-away
        # random init, and peak memory stays at one copy (ViT-g is 4.5 GB).
        with torch.device("meta"):
            self.vit = DinoVisionTransformer(cfg)
        if sd is None:
            if name is None:
                raise ValueError("DINOv2Encoder with a custom config needs weights (a path or a state dict)")
            sd, source = _from_hub(self.name), hub_url(self.name)
        _load_strict(self.vit, sd, source)

        p = cfg.patch_size
        if input_size is None:
            input_size = input_size_for(int(resolution), p)
        elif input_size <= 0 or input_size % p:
            raise ValueError(f"{self.name}: input_size must be a positive multiple of {p}, got {input_size}")
        self.resolution = int(resolution)
        self.input_size = int(input_size)
        self.token_dim = self.global_dim = cfg.embed_dim
        self._set_normalization([255.0 * m for m in IMAGENET_MEAN], [255.0 * s for s in IMAGENET_STD])
        self._freeze()

    def grid_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        side = self.input_size // self.config.patch_size
        return side, side

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {
            "resize": resize_spec((self.input_size, self.input_size)),
            "resize_rule": f"224 * resolution / 256 on the {self.config.patch_size}-px lattice"
            f" (resolution={self.resolution})",
            "normalize": {"formula": "(x / 255 - mean) / std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "features": {"tokens": "x_norm_patchtokens", "global": "x_norm_clstoken"},
            "config": asdict(self.config),
        }

    def preprocess(self, images: Tensor) -> Tensor:
        return self._normalize(self._resize_rgb(images, (self.input_size, self.input_size)))

    def encode(self, x: Tensor) -> EncoderOutput:
        out = self.vit.forward_features(x)
        # contiguous: slices of the full sequence would drag it along into torch.save
        return EncoderOutput(
            tokens=out["x_norm_patchtokens"].contiguous(), global_=out["x_norm_clstoken"].contiguous(), grid=out["grid"]
        )
