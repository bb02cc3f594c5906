"""Moving token sequences between grids.

Encoder tokens rarely sit on the diffusion model's patch grid (e.g. DINOv2 at
224 px gives 16 x 16, a SiT-S/2 on 32 px latents gives 16 x 16, but an
EfficientNet at 256 px gives 8 x 8). Two directions are supported:

* :func:`resample_tokens` brings encoder tokens onto the model grid
  (interpolation, up or down);
* :func:`pool_tokens` averages model tokens down onto a coarser encoder grid.

All modes are convex combinations of input tokens, so a constant field stays
constant. To make that hold bit for bit (not just up to rounding), the
resampling runs on offsets from the first token, which are exactly zero for a
constant field; mathematically this changes nothing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["tokens_to_map", "map_to_tokens", "resample_tokens", "pool_tokens"]

_MODES = ("bilinear", "area", "nearest")


def _grid(g) -> tuple[int, int]:
    h, w = (int(v) for v in g)
    if h <= 0 or w <= 0:
        raise ValueError(f"grid must be positive, got {(h, w)}")
    return h, w


def tokens_to_map(tokens: Tensor, grid) -> Tensor:
    """[B, N, D] row-major tokens -> [B, D, h, w] feature map."""
    h, w = _grid(grid)
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit grid {(h, w)} (need [B, {h * w}, D])")
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, h, w)


def map_to_tokens(x: Tensor) -> Tensor:
    """[B, D, h, w] feature map -> [B, h*w, D] row-major tokens."""
    return x.flatten(2).transpose(1, 2).contiguous()


def _anchored(x: Tensor, op) -> Tensor:
    # op is linear with weights summing to 1, so op(x - a) + a == op(x);
    # for a constant field x - a is exactly 0 and the output exactly a.
    anchor = x[:, :, :1, :1]
    return op(x - anchor) + anchor


def resample_tokens(tokens: Tensor, src_grid, dst_grid, mode: str = "bilinear") -> Tensor:
    """Resample [B, h*w, D] tokens from ``src_grid`` to ``dst_grid``.

    mode: "bilinear" (align_corners=False, antialiased when shrinking),
    "area" (box average; nearest-like when enlarging) or "nearest"
    (PyTorch's "nearest-exact", i.e. pixel-centre sampling, symmetric).
    """
    src, dst = _grid(src_grid), _grid(dst_grid)
    if mode not in _MODES:
        raise ValueError(f"unknown resample mode {mode!r}; expected one of {', '.join(_MODES)}")
    x = tokens_to_map(tokens, src)
    if src == dst:
        return tokens
    if mode == "bilinear":
        shrink = dst[0] < src[0] or dst[1] < src[1]
        y = _anchored(x, lambda t: F.interpolate(t, size=dst, mode="bilinear", align_corners=False, antialias=shrink))
    elif mode == "area":
        y = _anchored(x, lambda t: F.interpolate(t, size=dst, mode="area"))
    else:  # picks tokens, already exact
        y = F.interpolate(x, size=dst, mode="nearest-exact")
    return map_to_tokens(y)


def pool_tokens(tokens: Tensor, src_grid, dst_grid) -> Tensor:
    """Average-pool [B, h*w, D] tokens from a finer ``src_grid`` to ``dst_grid``.

    Uses non-overlapping windows when each side divides evenly, otherwise
    adaptive average pooling (windows of slightly uneven size). Enlarging is
    refused: use :func:`resample_tokens` for that direction.
    """
    src, dst = _grid(src_grid), _grid(dst_grid)
    if dst[0] > src[0] or dst[1] > src[1]:
        raise ValueError(f"pool_tokens only shrinks grids; got {src} -> {dst} (use resample_tokens)")
    x = tokens_to_map(tokens, src)
    if src == dst:
        return tokens
    if src[0] % dst[0] == 0 and src[1] % dst[1] == 0:
        k = (src[0] // dst[0], src[1] // dst[1])
        y = _anchored(x, lambda t: F.avg_pool2d(t, kernel_size=k, stride=k))
    else:
        y = _anchored(x, lambda t: F.adaptive_avg_pool2d(t, dst))
    return map_to_tokens(y)
