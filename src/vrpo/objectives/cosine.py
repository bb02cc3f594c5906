"""The token-wise cosine to gradient-free targets, with a hand-written backward.

Every alignment method compares projections z [..., D] to targets that carry no gradient
(encoder outputs, stop-gradient passes). Autograd's backward of ``z . y / |z|`` walks a chain
of full-size elementwise steps; the closed form ``d cos / dz = (y/|y| - cos z/|z|) / |z|`` is
two. ``projection_rewards`` reads one projection once for VRPO's three rewards (semantic
cosine, centred stability cosine of the first rows, token mean for fidelity) and writes one
gradient for it, where autograd would zero-fill the stability slice and add three full-size
gradients. Both equal autograd's result to float rounding (tests/test_cosine.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8  # F.cosine_similarity's: each norm is clamped here


def unit_targets(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if y.requires_grad:
        raise ValueError("cosine targets carry no gradient here: detach them (a target that learns needs autograd)")
    return F.normalize(y.to(dtype), dim=-1, eps=EPS)


def compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, torch.float32)  # half precision (autocast) is computed in float32


def cosine_forward(z: torch.Tensor, unit: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(cos(z, u) per token for unit targets u, the clamped |z|, cos / |z| where |z| was not clamped)."""
    raw = torch.linalg.vector_norm(z, dim=-1)
    norm = raw.clamp_min(EPS)
    value = (z * unit).sum(-1) / norm  # not linalg.vecdot: autocast would run it in half precision
    # where |z| was clamped it is a constant: cos = z . u / eps has no -cos z/|z| term
    ratio = torch.where(raw > EPS, value / norm, torch.zeros_like(value))
    return value, norm, ratio


def cosine_gradient(z, unit, norm, ratio, upstream: torch.Tensor) -> torch.Tensor:
    """d(sum upstream * cos)/dz = upstream (u - cos z/|z|) / |z|, in two full-size passes."""
    scale = upstream / norm
    grad = unit * scale.unsqueeze(-1)  # broadcasts a target shared over the tokens
    grad = grad.addcmul_(z, (scale * ratio).unsqueeze(-1), value=-1.0)
    return grad if grad.shape == z.shape else grad.sum_to_size(z.shape)


class _TokenCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, unit):
        zf = z.to(unit.dtype)
        value, norm, ratio = cosine_forward(zf, unit)
        ctx.save_for_backward(zf, unit, norm, ratio)
        ctx.z_dtype = z.dtype
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream):
        return cosine_gradient(*ctx.saved_tensors, upstream).to(ctx.z_dtype), None


def token_cosine(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(z, y) over the last dimension, as F.cosine_similarity (for norms above its eps, 1e-8), for
    targets y without gradient (a clear error otherwise); float32 at least. [..., D] -> [...]."""
    return _TokenCosine.apply(z, unit_targets(y, compute_dtype(z)))


class _ProjectionRewards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, semantic_unit, stability_unit, centre: bool, pooled: bool):
        ctx.set_materialize_grads(False)  # an output nobody used brings no zero gradient to add
        zf = z.to(compute_dtype(z))
        tokens = zf.shape[1]
        ctx.z_dtype, ctx.tokens, ctx.centre, ctx.shape = z.dtype, tokens, centre, zf.shape
        empty = zf.new_empty(0)
        semantic = stability = mean = empty
        saved = [None] * 8
        if semantic_unit is not None:
            value, norm, ratio = cosine_forward(zf, semantic_unit)
            semantic, saved[:4] = value.mean(1), (zf, semantic_unit, norm, ratio)
        if stability_unit is not None:
            rows = zf[: stability_unit.shape[0]]
            if centre:
                rows = rows - rows.mean(0, keepdim=True)
            value, norm, ratio = cosine_forward(rows, stability_unit)
            stability, saved[4:] = value.mean(1), (rows, stability_unit, norm, ratio)
        if pooled:
            mean = zf.sum(1) / tokens
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*(t for t in (semantic, stability, mean) if t.numel() == 0))
        return semantic, stability, mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_semantic, d_stability, d_mean):
        saved, tokens, grad = ctx.saved_tensors, ctx.tokens, None
        if d_semantic is not None and saved[0] is not None:
            grad = cosine_gradient(*saved[:4], (d_semantic / tokens).unsqueeze(1).expand(-1, tokens))
        if d_mean is not None and d_mean.numel():
            spread = (d_mean / tokens).unsqueeze(1)
            grad = spread.expand(ctx.shape).clone() if grad is None else grad.add_(spread)
        if d_stability is not None and saved[4] is not None:
            part = cosine_gradient(*saved[4:], (d_stability / tokens).unsqueeze(1).expand(-1, tokens))
            if ctx.centre:  # through the batch mean the rows were centred with
                part = part - part.mean(0, keepdim=True)
            if grad is None:
                grad = part.new_zeros(ctx.shape)
            grad[: part.shape[0]] += part
        return None if grad is None else grad.to(ctx.z_dtype), None, None, None, None


def projection_rewards(
    z: torch.Tensor,
    semantic_target: torch.Tensor | None,
    stability_target: torch.Tensor | None,
    centre: bool,
    pooled: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """VRPO's per-projection quantities from z [B, N, D] in one pass, each None when not asked:
    the token mean of cos(z, semantic_target) [B]; the token mean of cos(zc, ac) over the first n
    rows [n], z's rows and the gradient-free stability_target [n, N, D] both centred over those rows
    at each token when ``centre``; the token mean of z [B, D] when ``pooled``."""
    if z.dim() != 3:
        raise ValueError(f"a projection is [batch, tokens, dim], got {tuple(z.shape)}")
    rows = None if stability_target is None else stability_target.shape[0]
    for name, target, shape in (("semantic", semantic_target, z.shape), ("stability", stability_target, z.shape[1:])):
        # no broadcasting: the token means count z's tokens
        if target is not None and (target.dim() != 3 or target.shape[-len(shape) :] != shape):
            raise ValueError(f"{name} targets {tuple(target.shape)} do not match the projection {tuple(z.shape)}")
    if rows is not None and not 0 < rows <= z.shape[0]:
        raise ValueError(f"stability targets for {rows} rows of a projection of {z.shape[0]}")
    dtype = compute_dtype(z)
    semantic_unit = None if semantic_target is None else unit_targets(semantic_target, dtype)
    stability_unit = None
    if stability_target is not None:
        after = stability_target.to(dtype)
        if centre:
            after = after - after.mean(0, keepdim=True)
        stability_unit = unit_targets(after, dtype)
    semantic, stability, mean = _ProjectionRewards.apply(z, semantic_unit, stability_unit, centre, pooled)
    return (
        semantic if semantic_unit is not None else None,
        stability if stability_unit is not None else None,
        mean if pooled else None,
    )
