import math

import pytest
import torch

from vrpo.transport.ddpm import (
    GaussianDiffusion,
    create_ddpm,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    normal_kl,
    space_timesteps,
)


def _closed_form_abar(betas, t):
    # Independent product so the test does not reuse the module's cumprod.
    return math.prod(1.0 - float(b) for b in betas[: t + 1])


def _oracle(base: GaussianDiffusion, x0: torch.Tensor):
    """Model returning the true noise, read off the ORIGINAL schedule at the received time."""

    def model_fn(x_t, t_float):
        assert t_float.dtype == torch.float32
        idx = t_float.round().long()
        ab = base.alphas_cumprod[idx].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model_fn


def test_linear_schedule_matches_dit():
    b = linear_beta_schedule()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b4 = linear_beta_schedule(4000)
    assert b4[0].item() == pytest.approx(2.5e-5) and b4[-1].item() == pytest.approx(0.005)


def test_q_sample_mean_and_variance():
    d = GaussianDiffusion(linear_beta_schedule())
    betas = d.betas.tolist()
    x0 = torch.tensor([[0.7, -0.3]], dtype=torch.float64)
    for t in (0, 250, 999):
        ab = _closed_form_abar(betas, t)
        assert d.alphas_cumprod[t].item() == pytest.approx(ab, rel=1e-12)
        # Exact: q_sample is affine in noise.
        mean = d.q_sample(x0, t, torch.zeros_like(x0))
        torch.testing.assert_close(mean, math.sqrt(ab) * x0)
        unit = d.q_sample(torch.zeros_like(x0), t, torch.ones_like(x0))
        torch.testing.assert_close(unit, torch.full_like(x0, math.sqrt(1 - ab)))
        # Empirical moments with random noise.
        g = torch.Generator().manual_seed(t)
        xs = x0.expand(200_000, 2)
        eps = torch.randn(xs.shape, generator=g, dtype=torch.float64)
        samples = d.q_sample(xs, torch.full((xs.shape[0],), t), eps)
        torch.testing.assert_close(samples.mean(0), math.sqrt(ab) * x0[0], atol=0.01, rtol=0)
        var = torch.full((2,), 1 - ab, dtype=torch.float64)
        torch.testing.assert_close(samples.var(0), var, atol=0.01, rtol=0.02)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_bayes(t):
    d = GaussianDiffusion(linear_beta_schedule())
    betas = d.betas.tolist()
    beta, ab_prev = betas[t], _closed_form_abar(betas, t - 1)
    # Product of N(x | sqrt(ab_prev) x0, 1-ab_prev) and N(x_t | sqrt(1-beta) x, beta) in x.
    prec = 1.0 / (1 - ab_prev) + (1 - beta) / beta
    var = 1.0 / prec
    x0 = torch.tensor([[0.4, -1.2, 0.0]], dtype=torch.float64)
    xt = torch.tensor([[1.1, 0.3, -0.8]], dtype=torch.float64)
    mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * xt / beta)
    got_mean, got_var, got_log = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(got_mean, mean)
    assert got_var.item() == pytest.approx(var, rel=1e-10)
    assert got_log.item() == pytest.approx(math.log(var), rel=1e-10)


def test_posterior_at_t0_and_clipped_log():
    d = GaussianDiffusion(linear_beta_schedule())
    x0, xt = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, 0)
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    assert torch.allclose(log_var, torch.log(d.posterior_variance[1]).expand_as(log_var))


def test_normal_kl():
    m = torch.randn(5, dtype=torch.float64)
    lv = torch.randn(5, dtype=torch.float64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    m2, lv2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, (0.5 * lv).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref)


@pytest.mark.parametrize("mean,std", [(0.1, 0.3), (-0.9, 0.05), (0.0, 2.0)])
def test_discretized_likelihood_sums_to_one(mean, std):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std)))
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_space_timesteps():
    s = space_timesteps(1000, [250])
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999 and s == sorted(s)
    assert space_timesteps(1000, "250") == s == space_timesteps(1000, 250)
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, [1000]) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, [11])


def test_respacing():
    betas = linear_beta_schedule()
    base = GaussianDiffusion(betas)
    full = GaussianDiffusion.respaced(betas, range(1000))
    for name in (
        "betas",
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ):
        torch.testing.assert_close(getattr(full, name), getattr(base, name), rtol=1e-12, atol=1e-15)
    assert torch.equal(full.timestep_map, torch.arange(1000))

    keep = space_timesteps(1000, [250])
    sub = GaussianDiffusion.respaced(betas, keep)
    assert sub.num_timesteps == 250 and sub.original_num_steps == 1000
    assert sub.timestep_map.tolist() == keep
    torch.testing.assert_close(sub.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12, atol=0)
    assert create_ddpm(250).timestep_map.tolist() == keep


@pytest.mark.parametrize("respace", [None, 25])
def test_oracle_recovers_x0(respace):
    base = GaussianDiffusion(linear_beta_schedule())
    d = create_ddpm(respace)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    model = _oracle(base, x0)
    for t in (0, 1, d.num_timesteps // 2, d.num_timesteps - 1):
        tt = torch.full((4,), t)
        x_t = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        p = d.p_mean_variance(model, x_t, tt)
        torch.testing.assert_close(p["pred_xstart"], x0, rtol=0, atol=1e-9)
        # With x0 exact, the model mean is the true posterior mean.
        torch.testing.assert_close(p["mean"], d.q_posterior_mean_variance(x0, x_t, tt)[0])
    # Float32 path casts the schedule to x's dtype and still recovers x0.
    x32 = x0.float()
    x_t = d.q_sample(x32, d.num_timesteps - 1, torch.randn(x32.shape, generator=g))
    p = d.p_mean_variance(_oracle(base, x32), x_t, d.num_timesteps - 1)
    assert p["mean"].dtype == torch.float32
    torch.testing.assert_close(p["pred_xstart"], x32, rtol=0, atol=1e-3)
    # Oracle noise gives zero eps error.
    losses = d.training_losses(
        model, x0, torch.arange(4) % d.num_timesteps, torch.randn(x0.shape, generator=g, dtype=torch.float64)
    )
    assert losses["mse"].abs().max() < 1e-16


def test_p_sample_loop_deterministic_and_uses_original_times():
    d = create_ddpm(10)
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return torch.cat([0.1 * x, torch.tanh(x)], dim=1)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(2, 3, 4, 4, generator=g)
        return d.p_sample_loop(model_fn, z.shape, z, generator=g)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()
    times = [s[0].item() for s in seen[:10]]
    assert times == [float(v) for v in reversed(d.timestep_map.tolist())]
    assert all(s.dtype == torch.float32 and s.shape == (2,) for s in seen)
    # Without explicit noise the generator also supplies x_T.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        d.p_sample_loop(model_fn, (1, 3, 2, 2), generator=g1), d.p_sample_loop(model_fn, (1, 3, 2, 2), generator=g2)
    )


def test_last_step_adds_no_noise():
    d = create_ddpm(5)
    x = torch.randn(3, 2, 2, 2)
    model = lambda x, t: torch.cat([x, torch.zeros_like(x)], dim=1)  # noqa: E731
    s1 = d.p_sample(model, x, 0, generator=torch.Generator().manual_seed(0))["sample"]
    s2 = d.p_sample(model, x, 0, generator=torch.Generator().manual_seed(1))["sample"]
    assert torch.equal(s1, s2)
    torch.testing.assert_close(s1, d.p_mean_variance(model, x, 0)["mean"])


def test_vb_gradient_skips_eps_channels():
    d = GaussianDiffusion(linear_beta_schedule())
    g = torch.Generator().manual_seed(0)
    B, C = 4, 3
    x0 = torch.rand(B, C, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    out = (0.3 * torch.randn(B, 2 * C, 4, 4, generator=g)).requires_grad_()
    t = torch.tensor([0, 1, 400, 999])
    losses = d.training_losses(lambda x, tt: out, x0, t, noise)
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (B,) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.count_nonzero(g_vb[:, :C]) == 0
    assert g_vb[:, C:].abs().sum() > 0
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.count_nonzero(g_mse[:, C:]) == 0 and g_mse[:, :C].abs().sum() > 0


def test_vb_uses_decoder_nll_at_t0_and_kl_elsewhere():
    d = GaussianDiffusion(linear_beta_schedule())
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64).clamp(-1, 1)
    t = torch.tensor([0, 7])
    vb = d.training_losses(lambda x, tt: out, x0, t, noise)["vb"]
    x_t = d.q_sample(x0, t, noise)
    p = d.p_mean_variance(lambda x, tt: out, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
    qm, _, qlv = d.q_posterior_mean_variance(x0, x_t, t)
    kl = normal_kl(qm, qlv, p["mean"], p["log_variance"])
    assert vb[0].item() == pytest.approx(nll[0].mean().item() / math.log(2))
    assert vb[1].item() == pytest.approx(kl[1].mean().item() / math.log(2))
    # Rescaling mirrors DiT's RESCALED_MSE: factor num_timesteps / 1000.
    d250 = create_ddpm(250, rescale_vb=True)
    d250_plain = create_ddpm(250)
    a = d250.training_losses(lambda x, tt: out, x0, t, noise)["vb"]
    b = d250_plain.training_losses(lambda x, tt: out, x0, t, noise)["vb"]
    torch.testing.assert_close(a, 0.25 * b)


def test_bad_output_shape_raises():
    d = create_ddpm(4)
    with pytest.raises(ValueError):
        d.p_mean_variance(lambda x, t: x, torch.zeros(1, 2, 2, 2), 1)
