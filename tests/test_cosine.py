"""The hand-written backward of the alignment cosines equals autograd's of the plain formulas."""

import pytest
import torch
import torch.nn.functional as F

from vrpo.objectives.cosine import projection_rewards, token_cosine


def reference(z, y, after, centre, pooled):
    """VRPO's three per-projection quantities as plain autograd formulas (the version before the fusion)."""
    semantic = None if y is None else F.cosine_similarity(z, y, dim=-1, eps=1e-8).mean(1)
    stability = None
    if after is not None:
        rows = z[: after.shape[0]]
        if centre:
            rows, after = rows - rows.mean(0, keepdim=True), after - after.mean(0, keepdim=True)
        stability = F.cosine_similarity(rows, after, dim=-1, eps=1e-8).mean(1)
    return semantic, stability, z.mean(1) if pooled else None


def weighted(outputs, weights):
    return sum((w * o).sum() for o, w in zip(outputs, weights) if o is not None)


COMBINATIONS = [
    (parts, centre)
    for parts in ("semantic", "stability", "pooled", "semantic+stability", "stability+pooled", "semantic+pooled", "all")
    for centre in ((True, False) if "stability" in parts or parts == "all" else (True,))
]


def draws(parts, seed=0, zero_rows=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 5, 16, generator=g, dtype=torch.float64)
    if zero_rows:  # the clamped norm (|z| < 1e-8), in the stability rows and outside them
        z[0, 1], z[1, 3], z[4, 2] = 0.0, z[1, 3] * 1e-10, z[4, 2] * 1e-10
    y = torch.randn(6, 5, 16, generator=g, dtype=torch.float64) if "semantic" in parts or parts == "all" else None
    after = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) if "stability" in parts or parts == "all" else None
    weights = [torch.randn(6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64),
               torch.randn(6, 16, generator=g, dtype=torch.float64)]  # fmt: skip
    return z, y, after, "pooled" in parts or parts == "all", weights


def value_and_gradient(fn, z, y, after, centre, pooled, weights, used=(0, 1, 2)):
    leaf = z.clone().requires_grad_()
    outputs = fn(leaf, y, after, centre=centre, pooled=pooled)
    loss = weighted([o if i in used else None for i, o in enumerate(outputs)], weights)
    return outputs, torch.autograd.grad(loss, leaf)[0]


@pytest.mark.parametrize(("parts", "centre"), COMBINATIONS)
def test_projection_rewards_match_autograd_in_value_and_gradient(parts, centre):
    z, y, after, pooled, weights = draws(parts)
    (ours, ours_grad), (theirs, their_grad) = (
        value_and_gradient(fn, z, y, after, centre, pooled, weights) for fn in (projection_rewards, reference)
    )
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("used", [(0,), (1,), (2,), (0, 2)])
def test_an_output_left_out_of_the_loss_sends_no_gradient(used):
    # VRPO's gradient shares differentiate one reward term at a time
    z, y, after, pooled, weights = draws("all", seed=5)
    (_, ours), (_, theirs) = (
        value_and_gradient(fn, z, y, after, True, pooled, weights, used) for fn in (projection_rewards, reference)
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_zero_projection_tokens_get_the_gradient_of_the_clamped_norm():
    z, y, after, pooled, weights = draws("all", seed=6, zero_rows=True)

    def clamped(z, y, after, centre, pooled):  # the formula with the clamp written out, as before the fusion
        def cos(a, b):
            return (a * F.normalize(b, dim=-1, eps=1e-8)).sum(-1) / torch.linalg.vector_norm(a, dim=-1).clamp_min(1e-8)

        rows = z[: after.shape[0]]
        return cos(z, y).mean(1), cos(rows, after).mean(1), z.mean(1)

    (ours, ours_grad), (theirs, their_grad) = (
        value_and_gradient(fn, z, y, after, False, pooled, weights) for fn in (projection_rewards, clamped)
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(ours_grad).all()


def test_centred_stability_is_zero_for_a_projection_that_ignores_its_input():
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)  # a function of the position only
    z = per_token.expand(4, -1, -1).clone().requires_grad_()
    _, stability, _ = projection_rewards(z, None, per_token.expand(4, -1, -1), centre=True, pooled=False)
    assert stability.abs().max() == 0.0
    _, uncentred, _ = projection_rewards(z, None, per_token.expand(4, -1, -1), centre=False, pooled=False)
    torch.testing.assert_close(uncentred, torch.ones(4, dtype=torch.float64))  # version 1's trivial optimum


def test_a_retained_graph_gives_autograds_gradient_each_time():
    # VRPO's gradient shares differentiate the same graph once per term (retain_graph)
    z, y, after, pooled, weights = draws("all", seed=2)
    expected = value_and_gradient(reference, z, y, after, True, pooled, weights)[1]
    leaf = z.clone().requires_grad_()
    loss = weighted(projection_rewards(leaf * 1.0, y, after, centre=True, pooled=True), weights)
    for _ in range(2):
        torch.testing.assert_close(torch.autograd.grad(loss, leaf, retain_graph=True)[0], expected)
    cos = (weights[0][:, None] * token_cosine(leaf * 1.0, y)).sum()
    plain = torch.autograd.grad((weights[0][:, None] * F.cosine_similarity(leaf, y, dim=-1)).sum(), leaf)[0]
    for _ in range(2):
        torch.testing.assert_close(torch.autograd.grad(cos, leaf, retain_graph=True)[0], plain)


def test_under_autocast_the_cosines_are_float32_and_the_gradient_is_the_float32_one():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 6, 64, generator=g)
    y, after = torch.randn(4, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)
    head = torch.nn.Linear(64, 64)
    results = []
    for fn in (projection_rewards, reference):
        leaf = z.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            projected = head(leaf)  # bf16, as a projector's output in a bf16 run
            assert projected.dtype == torch.bfloat16
            if fn is reference:  # the float32 formula on the same bf16 projection
                projected = projected.float()
            outputs = fn(projected, y, after, centre=True, pooled=True)
        loss = sum(o.float().sum() for o in outputs)
        results.append((outputs, torch.autograd.grad(loss, leaf)[0]))
    (ours, ours_grad), (theirs, their_grad) = results
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 arithmetic, not bf16's 1e-2
    torch.testing.assert_close(ours_grad, their_grad, rtol=2e-2, atol=1e-3)  # the bf16 projector's backward
    value = token_cosine(z.to(torch.bfloat16), y)
    assert value.dtype == torch.float32


def test_a_target_that_carries_gradient_is_refused():
    z, y = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="targets carry no gradient"):
        token_cosine(z, y)
    with pytest.raises(ValueError, match="targets carry no gradient"):
        projection_rewards(z, y, None, centre=True, pooled=False)


def test_a_target_shared_over_the_tokens_broadcasts():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    y = torch.randn(3, 1, 8, generator=g, dtype=torch.float64)  # e.g. REG's global token
    for a, b in ((z, y), (y, z)):  # a target shared over tokens, and a projection compared with several
        grads = []
        for fn in (token_cosine, lambda p, q: F.cosine_similarity(p, q, dim=-1, eps=1e-8)):
            leaf = a.clone().requires_grad_()
            grads.append(torch.autograd.grad(fn(leaf, b).sum(), leaf)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not match the projection"):  # the fused pass takes equal grids only
        projection_rewards(z, y, None, centre=True, pooled=False)
    with pytest.raises(ValueError, match="do not match the projection"):
        projection_rewards(z, None, z[:2, :3], centre=True, pooled=False)
