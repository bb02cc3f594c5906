"""Frozen representation encoders (alignment targets) and token-grid helpers.

    enc = build_encoder("dinov2-vitb14", weights="/data/dinov2_vitb14_pretrain.pth")
    out = enc(images_uint8)          # EncoderOutput(tokens [B,N,D], global_ [B,D], grid (h,w))

See docs/encoders.md for preprocessing, grids and weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import EncoderOutput, FrozenEncoder, MultiEncoder, state_dict_sha256
from .dinov2 import DINOV2_PRESETS, DINOv2Config, DINOv2Encoder, DinoVisionTransformer, load_dinov2_weights
from .efficientnet import EfficientNetLite0Encoder
from .hf import TransformersEncoder, hf_global_width
from .tokens import map_to_tokens, pool_tokens, resample_tokens, tokens_to_map

__all__ = [
    "ENCODER_NAMES",
    "EncoderOutput",
    "FrozenEncoder",
    "MultiEncoder",
    "EfficientNetLite0Encoder",
    "TransformersEncoder",
    "DINOv2Encoder",
    "DINOv2Config",
    "DinoVisionTransformer",
    "load_dinov2_weights",
    "build_encoder",
    "build_encoders",
    "available_encoders",
    "global_width",
    "resample_tokens",
    "pool_tokens",
    "tokens_to_map",
    "map_to_tokens",
    "state_dict_sha256",
]

ENCODER_NAMES: tuple[str, ...] = ("efficientnet-lite0", *DINOV2_PRESETS)
_OPTIONS = {
    "efficientnet": ("input_size", "stage", "channels_last"),
    "dinov2": ("weights", "resolution", "input_size"),
}
HF_PREFIX = "hf:"
# REPA's --enc-type spellings, so its configs can be reused as they are.
_ALIASES = {f"dinov2-vit-{s}": f"dinov2-vit{s}14" for s in "sblg"}


def available_encoders() -> list[str]:
    return list(ENCODER_NAMES)


def global_width(name: str) -> int:
    """The width of an encoder's global vector, known without building it (EfficientNet-Lite0's
    pooled last stage; a DINOv2's CLS token; an ``hf:`` checkpoint's hidden size)."""
    if name.startswith(HF_PREFIX):
        return hf_global_width(name[len(HF_PREFIX) :])
    key = _canonical(name)
    return 1280 if key.startswith("efficientnet") else DINOV2_PRESETS[key].embed_dim


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    # Accept hub spellings too (dinov2_vitb14_reg).
    for valid in ENCODER_NAMES:
        if valid.replace("_", "-") == key.replace("_", "-"):
            return valid
    raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)}")


def build_encoder(spec: str | Mapping[str, Any], **opts: Any) -> FrozenEncoder:
    """Build one frozen encoder from a name or ``{"name": ..., **options}``.

    Options (keyword arguments override those in a dict spec):
      efficientnet-lite0: input_size=256, stage="last"|"stride16", channels_last=True
      dinov2-*:           weights=None (local path, or None for torch.hub),
                          resolution=256, input_size=None
      hf:<hub id or dir>: resolution=256, input_size=None (DINOv2, CLIP, SigLIP, MAE via transformers)
    """
    if isinstance(spec, Mapping):
        opts = {**{k: v for k, v in spec.items() if k != "name"}, **opts}
        if "name" not in spec:
            raise ValueError(f"encoder spec needs a 'name'; got keys {sorted(spec)}")
        spec = spec["name"]
    if not isinstance(spec, str):
        raise TypeError(f"encoder spec must be a name or a dict, got {type(spec).__name__}")
    if spec.startswith(HF_PREFIX):  # a hub id or a local directory, read through transformers
        bad = sorted(set(opts) - {"resolution", "input_size"})
        if bad:
            raise TypeError(f"{spec}: unknown option(s) {', '.join(bad)}; accepted: resolution, input_size")
        return TransformersEncoder(spec[len(HF_PREFIX) :], **opts)
    name = _canonical(spec)
    family = "efficientnet" if name.startswith("efficientnet") else "dinov2"
    bad = sorted(set(opts) - set(_OPTIONS[family]))
    if bad:
        raise TypeError(f"{name}: unknown option(s) {', '.join(bad)}; accepted: {', '.join(_OPTIONS[family])}")
    if family == "efficientnet":
        return EfficientNetLite0Encoder(**opts)
    return DINOv2Encoder(name, **opts)


def build_encoders(specs: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]]) -> MultiEncoder:
    """Build several encoders: a comma-separated string, one spec, or a list of specs."""
    if isinstance(specs, str):
        specs = [s for s in (part.strip() for part in specs.split(",")) if s]
    elif isinstance(specs, Mapping):
        specs = [specs]
    return MultiEncoder([build_encoder(s) for s in specs])
