"""DINOv2 weights: torch.hub checkpoints, transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``
directories mapped onto the hub names, and a strict load that names what does not fit."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .dinov2_vit import DINOv2Config, DinoVisionTransformer, hub_url

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
            return key[len(pre) :]
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
        return load_file(str(path), device="cpu")
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)


def _load_hf_dir(path: Path) -> tuple[dict[str, Tensor], DINOv2Config]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path} is a directory but has no config.json (expected a transformers Dinov2Model directory)"
        )
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
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
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
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
