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


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("parts", ["all", "semantic", "stability", "pooled", "semantic+pooled"])
def test_projection_rewards_match_autograd_in_value_and_gradient(centre, parts):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, 16, generator=g, dtype=torch.float64)
    y = torch.randn(6, 5, 16, generator=g, dtype=torch.float64) if "semantic" in parts or parts == "all" else None
    after = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) if parts in ("all", "stability") else None
    pooled = "pooled" in parts or parts == "all"
    weights = [torch.randn(6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64),
               torch.randn(6, 16, generator=g, dtype=torch.float64)]  # fmt: skip
    results = []
    for fn in (projection_rewards, reference):
        leaf = z.clone().requires_grad_()
        outputs = fn(leaf, y, after, centre=centre, pooled=pooled)
        results.append((outputs, torch.autograd.grad(weighted(outputs, weights), leaf)[0]))
    (ours, ours_grad), (theirs, their_grad) = results
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, their_grad, rtol=1e-10, atol=1e-12)


def test_centred_stability_is_zero_for_a_projection_that_ignores_its_input():
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)  # a function of the position only
    z = per_token.expand(4, -1, -1).clone().requires_grad_()
    _, stability, _ = projection_rewards(z, None, per_token.expand(4, -1, -1), centre=True, pooled=False)
    assert stability.abs().max() == 0.0
    _, uncentred, _ = projection_rewards(z, None, per_token.expand(4, -1, -1), centre=False, pooled=False)
    torch.testing.assert_close(uncentred, torch.ones(4, dtype=torch.float64))  # version 1's trivial optimum


def test_a_retained_graph_gives_the_same_gradient_twice():
    # VRPO's gradient shares differentiate the same graph once per term (retain_graph)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 3, 8, generator=g).requires_grad_()
    y, after = torch.randn(4, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    semantic, stability, pooled = projection_rewards(z * 1.0, y, after, centre=True, pooled=True)
    loss = semantic.sum() + stability.sum() + pooled.sum()
    first = torch.autograd.grad(loss, z, retain_graph=True)[0]
    second = torch.autograd.grad(loss, z)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    cos = token_cosine(z * 1.0, y).sum()
    assert torch.equal(torch.autograd.grad(cos, z, retain_graph=True)[0], torch.autograd.grad(cos, z)[0])


def test_low_precision_projections_are_computed_in_float32_and_get_their_own_dtype_back():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, 8, generator=g).to(torch.bfloat16).requires_grad_()
    y = torch.randn(4, 3, 8, generator=g)
    value = token_cosine(z, y)
    assert value.dtype == torch.float32
    value.sum().backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()
    expected = F.cosine_similarity(z.detach().float(), y, dim=-1).sum()
    assert float(value.detach().sum()) == pytest.approx(float(expected), rel=1e-5)


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
    grads = []
    for fn in (token_cosine, lambda a, b: F.cosine_similarity(a, b, dim=-1, eps=1e-8)):
        leaf = z.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(leaf, y).sum(), leaf)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
