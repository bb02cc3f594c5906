"""A torch.hub DINOv2 checkpoint (``dinov2_vitb14_pretrain.pth``, with or without registers)
converted once into a transformers directory, which ``hf:<dir>`` then reads.

The architecture is read off the tensors' shapes (width, depth, patch, position grid, registers,
SwiGLU); only the head count is not in the shapes: it follows the published models (64-wide
heads) unless given.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from torch import Tensor

from vrpo.errors import MissingExtra

from .dinov2_weights import _HF_LAYER, _HF_SIMPLE, _QKV, _load_file

HUB_SIMPLE = {hub: hf for hf, hub in _HF_SIMPLE.items()}
HUB_LAYER = {hub: hf for hf, hub in _HF_LAYER.items()}
HUB_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")
HEAD_WIDTH = 64  # ViT-S/B/L/g: 6, 12, 16 and 24 heads


def hub_to_hf_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hub names to transformers' Dinov2 names (qkv split into query, key, value); unknown keys are
    refused by name."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in HUB_SIMPLE:
            out[HUB_SIMPLE[key]] = value
            continue
        match = HUB_BLOCK_RE.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a DINOv2 hub weight")
        i, mid, leaf = match.groups()
        layer = f"encoder.layer.{i}"
        if mid == "attn.qkv":
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{layer}.attention.attention.{name}.{leaf}"] = part.clone()
        elif f"{mid}.{leaf}" in HUB_LAYER:  # the layer scales: ls1.gamma -> layer_scale1.lambda1
            out[f"{layer}.{HUB_LAYER[f'{mid}.{leaf}']}"] = value
        elif mid in HUB_LAYER:
            out[f"{layer}.{HUB_LAYER[mid]}.{leaf}"] = value
        else:
            raise ValueError(f"{key!r} is not a DINOv2 hub weight")
    return out


def hf_config_of(sd: dict[str, Tensor], heads: int | None = None) -> dict:
    """transformers config fields of a hub state dict, read off its shapes."""
    try:
        width = sd["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        patch = sd["patch_embed.proj.weight"].shape[-1]
        registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
        grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
        swiglu = "blocks.0.mlp.w12.weight" in sd
        hidden = sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(f"not a DINOv2 hub state dict (missing or odd {err})") from None
    heads = heads or width // HEAD_WIDTH
    ratio = (hidden * 3 / 2 if swiglu else hidden) / width
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads: pass --heads")
    config = dict(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
        image_size=grid * patch, mlp_ratio=int(ratio) if ratio.is_integer() else ratio, use_swiglu_ffn=swiglu,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, layer_norm_eps=1e-6, hidden_act="gelu", layerscale_value=1.0,
    )  # fmt: skip
    return {**config, "num_register_tokens": registers} if registers else config


def convert_dinov2(source: str | Path, out: str | Path, heads: int | None = None) -> Path:
    """Write a transformers directory (config.json, model.safetensors) holding the hub weights of ``source``."""
    try:
        import transformers
    except ImportError:
        raise MissingExtra("convert-dinov2 writes a transformers model: pip install -e .[imagenet]") from None
    sd = _load_file(Path(source).expanduser())
    fields = hf_config_of(sd, heads)
    if "num_register_tokens" in fields:
        config, model_cls = transformers.Dinov2WithRegistersConfig(**fields), transformers.Dinov2WithRegistersModel
    else:
        config, model_cls = transformers.Dinov2Config(**fields), transformers.Dinov2Model
    from safetensors.torch import save_file

    # The file in the naming of the published transformers checkpoints (transformers renames on load),
    # written beside the target and renamed into place once it loads: a failure leaves nothing behind.
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists: choose a new directory")
    tmp = out.with_name(f".{out.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in hub_to_hf_state_dict(sd).items()}, str(tmp / "model.safetensors"))
    try:
        _, info = model_cls.from_pretrained(tmp, output_loading_info=True, low_cpu_mem_usage=False)
    except RuntimeError as err:  # shapes that do not fit the configuration
        shutil.rmtree(tmp)
        raise ValueError(f"the converted weights do not load: {str(err).splitlines()[0][:200]}") from None
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        shutil.rmtree(tmp)
        missing, unexpected = sorted(info["missing_keys"])[:4], sorted(info["unexpected_keys"])[:4]
        raise ValueError(f"the converted weights do not fit: missing {missing}, unexpected {unexpected}")
    tmp.rename(out)
    return out
