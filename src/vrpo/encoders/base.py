"""Frozen image encoders: the interface every representation target implements.

An encoder takes raw uint8 images (B x C x H x W, C = 1 or 3, values 0..255),
applies its own preprocessing and returns patch tokens plus a global vector.
It never trains: parameters are frozen, eval mode is forced and the forward
pass runs without autograd.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EncoderOutput", "FrozenEncoder", "MultiEncoder", "state_dict_sha256"]


@dataclass
class EncoderOutput:
    """What an encoder returns for a batch.

    tokens:  [B, N, D] patch tokens in row-major order of ``grid``.
    global_: [B, D'] one vector per image (CLS token or pooled tokens).
    grid:    (h, w) with h * w == N.
    """

    tokens: Tensor
    global_: Tensor
    grid: tuple[int, int]


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of every state-dict tensor."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # A uint8 view gives the exact bytes for any dtype (bf16 included).
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FrozenEncoder(nn.Module, abc.ABC):
    """Base class: a frozen, preprocessing-owning image encoder.

    Subclasses set ``name``, ``token_dim`` and ``global_dim``, implement
    :meth:`grid_for`, :meth:`preprocess`, :meth:`encode` and the
    :attr:`preprocessing` description, and call :meth:`_freeze` at the end of
    ``__init__``.
    """

    name: str
    token_dim: int
    global_dim: int

    def __init__(self) -> None:
        super().__init__()
        self._weights_hash: str | None = None

    # -- frozen-ness ---------------------------------------------------------
    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Callers toggle train()/eval() on the whole model; the encoder must
        # stay in eval (BatchNorm statistics, dropout) regardless.
        return super().train(False)

    # -- identity for feature caches -----------------------------------------
    @property
    def weights_hash(self) -> str:
        """sha256 of the weights; computed on first access, then cached."""
        if self._weights_hash is None:
            self._weights_hash = state_dict_sha256(self)
        return self._weights_hash

    @property
    @abc.abstractmethod
    def preprocessing(self) -> dict[str, Any]:
        """JSON-serialisable description of resize and normalisation."""

    def describe(self) -> dict[str, Any]:
        """Everything a feature-cache manifest needs to identify these features."""
        return {
            "name": self.name,
            "token_dim": self.token_dim,
            "global_dim": self.global_dim,
            "weights_hash": self.weights_hash,
            "preprocessing": self.preprocessing,
        }

    # -- shapes --------------------------------------------------------------
    @abc.abstractmethod
    def grid_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) produced for input images of size ``image_hw``."""

    # -- forward -------------------------------------------------------------
    @abc.abstractmethod
    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 images -> float network input (resized, 3 channels, normalised)."""

    @abc.abstractmethod
    def encode(self, x: Tensor) -> EncoderOutput:
        """Preprocessed input -> tokens and global vector."""

    def forward(self, images: Tensor) -> EncoderOutput:
        with torch.no_grad():
            return self.encode(self.preprocess(images))

    exposes_attention: bool = False  # a ViT's attention maps are alignment targets (HASTE)

    def attention_maps(self, images: Tensor, blocks) -> dict[int, Tensor]:
        """{block (1-based): patch-to-patch attention logits [B, H, N, N]} for uint8 images."""
        raise ValueError(f"{self.name} exposes no attention maps (HASTE's attention term needs a ViT: DINOv2)")

    # -- helpers shared by subclasses ----------------------------------------
    def _set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-channel mean/std in 0..255 pixel units.

        Non-persistent buffers: they follow ``.to(device)`` but stay out of the
        state dict, so weight loading and ``weights_hash`` see only weights.
        """
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{self.name}: expected images of shape [B, C, H, W], got {shape}")
        if images.dtype != torch.uint8:
            raise TypeError(
                f"{self.name}: expected uint8 images with values 0..255, got {images.dtype}; "
                "convert e.g. with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
            )
        if images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected 1 or 3 channels, got {images.shape[1]}")

    def _resize_rgb(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """Validate, cast to float (still 0..255), resize and replicate grayscale."""
        self._check_images(images)
        x = images.to(self._device(), torch.float32)
        if tuple(x.shape[-2:]) != tuple(size):
            # Antialias matters when downsampling large images; it is a
            # no-op for upsampling (e.g. 32 px Fashion-MNIST).
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x


def resize_spec(size: Sequence[int]) -> dict[str, Any]:
    """The resize entry shared by every encoder's ``preprocessing`` dict."""
    return {
        "size": [int(size[0]), int(size[1])],
        "mode": "bilinear",
        "antialias": True,
        "align_corners": False,
        "grayscale": "replicated to 3 channels",
    }


class MultiEncoder(nn.Module):
    """Several frozen encoders run on the same images (REPA can align to many).

    ``forward`` returns one :class:`EncoderOutput` per encoder, in order.
    """

    def __init__(self, encoders: Sequence[FrozenEncoder]) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("MultiEncoder needs at least one encoder")
        self.encoders = nn.ModuleList(encoders)
        super().train(False)

    def train(self, mode: bool = True) -> MultiEncoder:
        return super().train(False)

    def __len__(self) -> int:
        return len(self.encoders)

    def __iter__(self):
        return iter(self.encoders)

    def __getitem__(self, i: int) -> FrozenEncoder:
        return self.encoders[i]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.encoders]

    @property
    def token_dims(self) -> list[int]:
        return [e.token_dim for e in self.encoders]

    @property
    def global_dims(self) -> list[int]:
        return [e.global_dim for e in self.encoders]

    def grids_for(self, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
        return [e.grid_for(image_hw) for e in self.encoders]

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe() for e in self.encoders]

    def forward(self, images: Tensor) -> list[EncoderOutput]:
        return [e(images) for e in self.encoders]
