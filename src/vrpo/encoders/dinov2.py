"""DINOv2 encoders (with and without registers): the ViT of ``dinov2_vit`` with weights read by
``dinov2_weights`` (torch.hub checkpoints, or transformers directories mapped onto their names),
behind the ``FrozenEncoder`` interface.

Preprocessing (as REPA): uint8 -> /255 -> bilinear (antialiased) resize to
224 * resolution / 256 (rounded to a multiple of 14; 224 for the default
resolution 256) -> grayscale replicated to RGB -> ImageNet mean/std.
Targets: final-LayerNorm patch tokens (``x_norm_patchtokens``); global: the
normed CLS token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from .base import EncoderOutput, FrozenEncoder, resize_spec
from .dinov2_vit import DINOV2_PRESETS, IMAGENET_MEAN, IMAGENET_STD, DINOv2Config, DinoVisionTransformer, hub_url
from .dinov2_weights import (
    _from_hub,
    _is_hf_naming,
    _load_strict,
    config_from_hf,
    hf_to_hub_state_dict,
    load_dinov2_weights,
)

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

    exposes_attention = True

    def attention_maps(self, images: Tensor, blocks) -> dict[int, Tensor]:
        with torch.no_grad():
            return self.vit.forward_features(self.preprocess(images), attention_blocks=set(blocks))["attention"]

    def encode(self, x: Tensor) -> EncoderOutput:
        out = self.vit.forward_features(x)
        # contiguous: slices of the full sequence would drag it along into torch.save
        return EncoderOutput(
            tokens=out["x_norm_patchtokens"].contiguous(), global_=out["x_norm_clstoken"].contiguous(), grid=out["grid"]
        )
