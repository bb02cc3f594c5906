"""Encoders read through ``transformers``: ``hf:<hub id or local directory>``.

One class serves the vision towers REPA offers where ``transformers`` has them, told apart by
the checkpoint's ``model_type``:

- DINOv2 (``dinov2``, ``dinov2_with_registers``): patch tokens after the final LayerNorm, CLS
  as the global vector, registers dropped; input 224 px per 256 px of generation resolution on
  the 14-px lattice (REPA's rule), ImageNet normalisation.
- CLIP (``clip``, ``clip_vision_model``): the vision tower's last hidden state without CLS,
  the post-LayerNorm CLS as the global vector; its own mean and std; the checkpoint's input size.
- SigLIP (``siglip``, ``siglip_vision_model``): no CLS; the attention-pooled vector as the
  global one; mean = std = 0.5.
- MAE (``vit_mae``): the encoder with masking off (mask ratio 0, the patches in their order).

``diffusers`` and ``transformers`` are the ``imagenet`` extra; without them the name says
what to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vrpo.errors import MissingExtra

from .base import EncoderOutput, FrozenEncoder, resize_spec
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, input_size_for

INSTALL = "pip install -e .[imagenet] (transformers)"


@dataclass(frozen=True)
class Family:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    prefix_tokens: str  # cls, cls+registers or none: the tokens before the patches
    global_from: str  # cls (last hidden state's first token) or pooler
    scales_with_resolution: bool  # DINOv2 interpolates its position embeddings; the others keep their size


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
FAMILIES = {
    "dinov2": Family(IMAGENET_MEAN, IMAGENET_STD, "cls+registers", "cls", True),
    "dinov2_with_registers": Family(IMAGENET_MEAN, IMAGENET_STD, "cls+registers", "cls", True),
    "clip": Family(CLIP_MEAN, CLIP_STD, "cls", "pooler", False),
    "clip_vision_model": Family(CLIP_MEAN, CLIP_STD, "cls", "pooler", False),
    "siglip": Family((0.5,) * 3, (0.5,) * 3, "none", "pooler", False),
    "siglip_vision_model": Family((0.5,) * 3, (0.5,) * 3, "none", "pooler", False),
    "vit_mae": Family(IMAGENET_MEAN, IMAGENET_STD, "cls", "cls", False),
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingExtra(f"hf: encoders need transformers: {INSTALL}") from None
    return transformers


def vision_config(source: str):
    """The checkpoint's vision configuration (a CLIP or SigLIP checkpoint's vision part) and its model type."""
    config = _transformers().AutoConfig.from_pretrained(source)
    model_type = config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"hf:{source} is a {model_type!r} checkpoint; hf: encoders read {', '.join(FAMILIES)}")
    return getattr(config, "vision_config", config), model_type


def hf_global_width(source: str) -> int:
    return vision_config(source)[0].hidden_size


class TransformersEncoder(FrozenEncoder):
    """A frozen vision tower from ``transformers``; ``source`` is a hub id or a local directory."""

    def __init__(self, source: str, resolution: int = 256, input_size: int | None = None) -> None:
        super().__init__()
        transformers = _transformers()
        config, self.model_type = vision_config(source)
        self.family = FAMILIES[self.model_type]
        self.source, self.name = source, f"hf:{source}"
        if self.model_type.startswith("clip"):
            self.net = transformers.CLIPVisionModel.from_pretrained(source)
        elif self.model_type.startswith("siglip"):
            self.net = transformers.SiglipVisionModel.from_pretrained(source)
        elif self.model_type == "vit_mae":
            self.net = transformers.ViTMAEModel.from_pretrained(source, mask_ratio=0.0)
        else:
            self.net = transformers.AutoModel.from_pretrained(source)
        self.net.float()  # a checkpoint stored in half precision meets float32 inputs (autocast decides later)
        self.patch = config.patch_size
        if input_size is None:
            input_size = input_size_for(int(resolution), self.patch) if self.family.scales_with_resolution else None
            input_size = input_size or config.image_size
        if input_size <= 0 or (self.family.scales_with_resolution and input_size % self.patch):
            raise ValueError(f"{self.name}: input_size must be a positive multiple of {self.patch}, got {input_size}")
        if not self.family.scales_with_resolution and input_size != config.image_size:
            raise ValueError(
                f"{self.name} takes {config.image_size}-px inputs (its position embeddings), not {input_size}"
            )
        self.input_size, self.resolution = int(input_size), int(resolution)
        registers = getattr(config, "num_register_tokens", 0) if "registers" in self.family.prefix_tokens else 0
        self.prefix = {"none": 0, "cls": 1}.get(self.family.prefix_tokens, 1 + registers)
        self.token_dim = self.global_dim = config.hidden_size
        self._set_normalization([255.0 * m for m in self.family.mean], [255.0 * s for s in self.family.std])
        self._freeze()

    def grid_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        side = self.input_size // self.patch  # the convolution drops a remainder (SigLIP so400m: 384 / 14)
        return side, side

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "model_type": self.model_type,
            "resize": resize_spec((self.input_size, self.input_size)),
            "normalize": {
                "formula": "(x / 255 - mean) / std",
                "mean": list(self.family.mean),
                "std": list(self.family.std),
            },
            "features": {"tokens": f"last_hidden_state[:, {self.prefix}:]", "global": self.family.global_from},
        }

    def preprocess(self, images: Tensor) -> Tensor:
        return self._normalize(self._resize_rgb(images, (self.input_size, self.input_size)))

    def encode(self, x: Tensor) -> EncoderOutput:
        extra = {}
        if self.model_type == "vit_mae":  # increasing noise: the patches keep their order
            n = (self.input_size // self.patch) ** 2
            extra["noise"] = torch.arange(n, device=x.device, dtype=x.dtype).expand(x.shape[0], n)
        out = self.net(pixel_values=x, **extra)
        hidden = out.last_hidden_state
        global_ = out.pooler_output if self.family.global_from == "pooler" else hidden[:, 0]
        if global_ is None:  # a SigLIP tower without its pooling head: the tokens' mean
            global_ = hidden.mean(1)
        return EncoderOutput(hidden[:, self.prefix :].contiguous(), global_.contiguous(), self.grid_for((0, 0)))
