"""VRPO (docs/vrpo.md): Prop. 2 against REPA, weights and lambda, the stability pass, policy
weights and groups, the fidelity reward, statistics in checkpoints, layer modes, errors."""

import json
import sys
import types

import pytest
import torch

from vrpo.config import ConfigError, load_config
from vrpo.data import step_generator
from vrpo.eval.frechet import frechet_distance
from vrpo.objectives import build_objective
from vrpo.objectives.vrpo import frechet_reward_terms, plot_vrpo, psd_sqrt
from vrpo.objectives.vrpo.rewards import advantages, clip_fidelity, fidelity_reward, policy_weights

SMALL = [
    "data.name=digits",
    "data.limit=40",
    "model.arch=SiT-T/8",
    "objective.projector_width=64",
    "objective.encoder_input_size=64",
    "train.batch_size=4",
    "objective.feature_cache=null",
    "objective.spec=1",  # these tests pin version 1, still reachable; tests/test_vrpo_v2.py tests version 2
]


def vrpo_config(*extra):
    return load_config("configs/fmnist/vrpo-t2.yaml", [*SMALL, *extra])


def build(model, data, *extra):
    torch.manual_seed(1)  # the same heads for every objective a test compares
    return build_objective(vrpo_config(*extra), model, data)


def grads(*modules) -> dict:
    return {
        f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters() if p.grad is not None
    }


def block_grads(model) -> list[bool]:
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in model.blocks]


def test_semantic_only_reproduces_repa_loss_and_gradients(base):
    """Prop. 2: one reward, fixed lambda, no normalisation, no policy = REPA, to the gradient."""
    data, model, repa, batch = base
    vrpo = build(
        model,
        data,
        "objective.rewards=[semantic]",
        "objective.adaptive_lambda=false",
        "objective.normalize=false",
        "objective.policy=false",
        "objective.lambda_0=0.5",
        "objective.warmup_steps=1",
    )
    assert_matches_repa(vrpo, repa, model, batch)


def assert_matches_repa(vrpo, repa, model, batch):
    """Prop. 2's check: with REPA's heads, past warm-up, the loss and every gradient equal REPA's to 1e-6."""
    vrpo.alignment.load_state_dict(repa.alignment.state_dict())
    for s in range(2):  # past warm-up, with statistics: the single weight stays 1
        vrpo.loss(model, batch, step_generator(0, s))
        vrpo.end_of_step(s, True)
    results = []
    for objective in (repa, vrpo):
        model.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
        out = objective.loss(model, batch, step_generator(0, 7))
        out.loss.backward()
        results.append((out.loss.detach(), grads(model, objective.alignment)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-6, atol=1e-12, msg=key)
    model.zero_grad(set_to_none=True)


def feed(vrpo, comps, samples):
    """One committed step of synthetic statistics (real features: zeros)."""
    real = (
        [torch.zeros(samples.shape[1], e.token_dim) for e in vrpo.alignment.encoders]
        if "fidelity" in vrpo.rewards
        else []
    )
    total = vrpo.weights().float() @ samples
    vrpo.record(comps, samples, total, real)
    vrpo.end_of_step(int(vrpo.steps_done), True)


def test_inverse_variance_weights_converge_and_lambda_follows_v_R(base):
    data, model, _, _ = base
    vrpo = build(model, data, "objective.warmup_steps=20", "objective.stats_decay=0.998")
    sigma = torch.tensor([0.1, 0.2, 0.4])  # std of each component's batch mean
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        comps = torch.tensor([0.3, 0.9, -1.0]) + sigma * torch.randn(3, generator=gen)
        feed(vrpo, comps, comps[:, None] + 0.05 * torch.randn(3, 8, generator=gen))
    analytic = (1 / sigma**2) / (1 / sigma**2).sum()
    torch.testing.assert_close(vrpo.weights().float(), analytic, rtol=0.15, atol=0)
    # lambda_s: lambda_0 at v_R_ref, monotone in v_R, clipped to its bounds
    o = vrpo.options
    ref = float(vrpo.v_R_ref)
    assert ref > 0 and float(vrpo.lambda_s(torch.tensor(ref))) == pytest.approx(o.lambda_0)
    values = [float(vrpo.lambda_s(torch.tensor(ref * f))) for f in (1e-6, 0.01, 0.5, 1, 2, 10, 1e6)]
    assert values == sorted(values) and values[0] == o.lambda_min and values[-1] == o.lambda_max
    # fed a stream whose spread grows, lambda_s grows with it
    seen = []
    for spread in (0.05, 0.2, 0.8):
        for _ in range(1500):
            comps = torch.tensor([0.3, 0.9, -1.0]) + sigma * torch.randn(3, generator=gen)
            feed(vrpo, comps, comps[:, None] + spread * torch.randn(3, 8, generator=gen))
        seen.append(float(vrpo.lambda_s(vrpo.total_stats(vrpo.weights())[1])))
    assert seen[0] < seen[1] < seen[2] and all(o.lambda_min <= v <= o.lambda_max for v in seen)


def test_stability_pass_is_gradient_free_partial_and_uses_the_same_noise(base):
    data, model, _, batch = base
    vrpo = build(model, data)
    d = vrpo.alignment.depth
    step = vrpo.denoise(model, batch, step_generator(0, 0))
    calls = []
    with pytest.MonkeyPatch.context() as mp:

        def counted(forward, index):
            return lambda *a, **k: calls.append(index) or forward(*a, **k)

        for i, block in enumerate(model.blocks, start=1):
            mp.setattr(block, "forward", counted(block.forward, i))
        after = vrpo.stability_targets(model, batch, step)
    assert calls == list(range(1, d + 1))  # blocks 1..d only, once each
    assert list(after) == [d] and not any(z.requires_grad or z.grad_fn is not None for z in after[d])
    # by hand: t' = max(t - delta, 0) with the SAME noise, projected by the same heads
    t = (step.t - 0.05).clamp_min(0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * batch.x + t.view(-1, 1, 1, 1) * step.noise
    h = model(x_t, t * 1000, step.labels, hidden_layers=[d]).hidden[d]
    torch.testing.assert_close(after[d][0], vrpo.alignment.projectors[0](h), rtol=1e-5, atol=1e-6)
    # in the loss, the gradient of the stability reward reaches blocks 1..d through the online branch
    model.zero_grad(set_to_none=True)
    stab = build(model, data, "objective.rewards=[stability]", "objective.policy=false")
    _, align, logs = stab.terms(model, batch, step_generator(0, 0))
    align.backward()
    assert block_grads(model) == [i <= d for i in range(1, 7)] and -1 <= float(logs["r_stability"]) <= 1
    model.zero_grad(set_to_none=True)


def test_policy_weights_and_group_relative_advantages(base):
    data, model, _, batch = base
    vrpo = build(model, data)
    a = policy_weights(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3, vrpo.options)
    assert (a > 0).all() and float(a.mean()) == pytest.approx(1.0)
    assert float(a.max() / a.min()) <= torch.exp(torch.tensor(4.0)) * (1 + 1e-5)  # clip c = 2, tau = 1
    grouped = build(model, data, "objective.group_size=2")
    rows, images = grouped.grouped(batch)
    assert rows.index.tolist() == [0, 0, 1, 1] and images.index.tolist() == [0, 1]
    adv = advantages(torch.randn(12, generator=torch.Generator().manual_seed(1)), None, None, grouped.options).view(
        -1, 2
    )
    torch.testing.assert_close(adv.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1), torch.ones(6), atol=1e-4, rtol=0)
    _, _, logs = grouped.terms(model, batch, step_generator(0, 0))
    assert logs["pw_min"] > 0 and float(logs["adv_mean"]) == pytest.approx(0.0, abs=1e-5)
    wide = build(model, data, "objective.group_size=3", "objective.group_batch=images")
    assert wide.grouped(batch)[0].x.shape[0] == 12


def test_fidelity_reward_falls_as_statistics_move_away(base):
    data, model, _, _ = base
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(4096, 8, generator=gen).double() * torch.linspace(0.5, 2, 8).double() + 1
    mean, cov = real.mean(0), torch.cov(real.T, correction=0)
    fake = torch.randn(64, 8, generator=gen)
    for mode, reference in (("diagonal", (mean, cov.diagonal(), None)), ("full", (mean, cov, psd_sqrt(cov)))):
        vrpo = build(model, data, "objective.rewards=[fidelity]", f"objective.fidelity={mode}", "train.batch_size=4096")
        rewards = []
        for shift in (0.0, 0.5, 1.0, 2.0):  # mean and spread move away together
            g = (fake.double() * torch.linspace(0.5, 2, 8).double() * (1 + shift) + 1 + shift).float()
            r = fidelity_reward([g], [reference], vrpo.options)  # the token means
            rewards.append((float(r.batch), float(r.sample.mean())))
        assert [b for b, _ in rewards] == sorted([b for b, _ in rewards], reverse=True)
        assert [s for _, s in rewards] == sorted([s for _, s in rewards], reverse=True)
    # the full form is the Frechet distance of the evaluation code (population covariance)
    g = fake.double() * 1.3 + 0.2
    expected = frechet_distance(g.mean(0), torch.cov(g.T, correction=0), mean, cov)
    assert float(frechet_reward_terms(g, mean, cov, psd_sqrt(cov))) == pytest.approx(expected, rel=1e-6)
    # the floor bounds it: hard clamps, soft saturates smoothly
    far = build(model, data, "objective.fidelity_floor=-1")
    assert float(clip_fidelity(torch.tensor(-50.0), -1.0, far.options.fidelity_clip)) == -1.0
    soft = build(model, data, "objective.fidelity_floor=-1", "objective.fidelity_clip=soft")
    x = torch.tensor(-50.0, requires_grad=True)
    clip_fidelity(x, -1.0, soft.options.fidelity_clip).backward()
    assert (
        float(clip_fidelity(x.detach(), -1.0, soft.options.fidelity_clip)) == pytest.approx(-1.0) and x.grad is not None
    )


def test_statistics_are_committed_per_step_and_round_trip_through_state_dict(base):
    data, model, _, batch = base
    vrpo = build(model, data, "objective.warmup_steps=2")
    # two micro-batches (gradient accumulation) then one commit: the mean of the two
    logs = [vrpo.terms(model, batch, step_generator(0, 0, m))[2] for m in range(2)]
    assert len(vrpo._pending) == 2
    vrpo.end_of_step(0, True)
    comps = torch.tensor([[float(log[f"r_{k}"]) for k in vrpo.rewards] for log in logs]).double().mean(0)
    torch.testing.assert_close(vrpo.reward_moments[0], 0.01 * comps, rtol=1e-5, atol=0)
    before = {k: v.clone() for k, v in vrpo.state_dict().items()}
    vrpo.loss(model, batch, step_generator(0, 1))
    vrpo.end_of_step(1, False)  # a skipped step changes nothing but the step count
    after = vrpo.state_dict()
    assert int(after["steps_done"]) == 2 and not vrpo._pending
    assert all(torch.equal(before[k], after[k]) for k in before if k != "steps_done")
    for s in range(2, 4):
        vrpo.loss(model, batch, step_generator(0, s))
        vrpo.end_of_step(s, True)
    state = vrpo.state_dict()
    for key in (
        "updates",
        "reward_moments",
        "sample_first",
        "sample_second",
        "total_moments",
        "v_R_ref",
        "real_first_0",
        "real_second_0",
        "grad_share",
    ):
        assert key in state
    assert float(state["v_R_ref"]) > 0
    fresh = build(model, data, "objective.warmup_steps=2")
    fresh.load_state_dict(state)
    assert all(torch.equal(state[k], fresh.state_dict()[k]) for k in state)
    a = vrpo.terms(model, batch, step_generator(0, 4))
    b = fresh.terms(model, batch, step_generator(0, 4))
    assert torch.equal(a[0] + a[1], b[0] + b[1])
    assert {k: float(v) for k, v in a[2].items()} == {k: float(v) for k, v in b[2].items()}


def test_logs_and_gradient_shares(base):
    data, model, _, batch = base
    vrpo = build(model, data)
    out = vrpo.loss(model, batch, step_generator(0, 0))
    for key in (
        "loss_denoise",
        "loss_align",
        "lambda_s",
        "adv_mean",
        "adv_std",
        "adv_min",
        "adv_max",
        "pw_min",
        "pw_max",
        "r_semantic",
        "r_semantic_var",
        "w_semantic",
        "w_stability",
        "w_fidelity",
        "gshare_denoise",
        "gshare_semantic",
    ):
        assert key in out.logs, key
    vrpo.end_of_step(0, applied=True)  # the step's measurements (one per micro-batch and rank) are averaged here
    share = dict(zip(vrpo.share_names, vrpo.grad_share.tolist()))
    assert share["denoise"] + share["align"] == pytest.approx(1.0)
    assert sum(share[k] for k in vrpo.rewards) == pytest.approx(1.0)
    assert model.blocks[0].attn.qkv.weight.grad is None  # measuring did not touch .grad


@pytest.mark.parametrize(
    "layers, reached",
    [
        ("block", [1, 1, 0, 0, 0, 0]),
        ("early", [1, 1, 0, 0, 0, 0]),  # round(3 * 6 / 8) = 2
        ("mid", [0, 1, 1, 0, 0, 0]),  # aligned at 3, cut below 6 // 4 = 1
        ("all", [1, 1, 1, 1, 1, 1]),
    ],
)
def test_reward_gradients_reach_only_the_selected_blocks(base, layers, reached):
    data, model, _, batch = base
    extra = ["objective.layer_projectors=per_block"] if layers == "all" else []
    vrpo = build(model, data, f"objective.layers={layers}", *extra)
    model.zero_grad(set_to_none=True)
    _, align, _ = vrpo.terms(model, batch, step_generator(0, 0))
    align.backward()
    assert block_grads(model) == [bool(r) for r in reached]
    assert model.patch_embed.weight.grad is None or layers != "mid"
    if layers == "all":
        assert all(p.grad is not None for p in vrpo.block_projectors.parameters())
    model.zero_grad(set_to_none=True)


def test_detach_after_cuts_the_graph_but_not_the_values(base):
    data, model, _, batch = base
    x, t, y = batch.x, torch.full((4,), 300.0), batch.labels
    plain = model(x, t, y, hidden_layers=[3], stop_after=3).hidden[3]
    cut = model(x, t, y, hidden_layers=[3], stop_after=3, detach_after=1).hidden[3]
    assert torch.equal(plain, cut)
    model.zero_grad(set_to_none=True)
    cut.sum().backward()
    assert block_grads(model) == [False, True, True, False, False, False] and model.patch_embed.weight.grad is None
    model.zero_grad(set_to_none=True)


def test_semantic_global_and_both_use_an_identity_initialised_head(base):
    data, model, _, batch = base
    for form in ("global", "both"):
        vrpo = build(model, data, "objective.rewards=[semantic]", f"objective.semantic={form}")
        head = vrpo.global_heads[0]
        assert torch.equal(head.weight[: head.in_features], torch.eye(head.in_features))
        _, align, logs = vrpo.terms(model, batch, step_generator(0, 0))
        align.backward()
        assert head.weight.grad is not None and -1 <= float(logs["r_semantic"]) <= 1
    model.zero_grad(set_to_none=True)


def test_pathwise_off_trains_only_the_heads(base):
    data, model, _, batch = base
    vrpo = build(model, data, "objective.pathwise=false")
    model.zero_grad(set_to_none=True)
    _, align, _ = vrpo.terms(model, batch, step_generator(0, 0))
    align.backward()
    assert not any(block_grads(model)) and vrpo.alignment.projectors[0].net[0].weight.grad is not None


def test_perceptual_reward_with_an_lpips_module(base, monkeypatch):
    """The real LPIPS needs downloaded weights; a stand-in module checks the wiring."""
    data, model, _, batch = base

    class LPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()

        def forward(self, a, b):
            assert a.shape[1] == 3
            return (a - b).pow(2).mean((1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=LPIPS))
    plain = build(model, data)
    perceptual = build(model, data, "objective.perceptual=lpips")
    a = plain.terms(model, batch, step_generator(0, 0))[2]["r_fidelity"]
    b = perceptual.terms(model, batch, step_generator(0, 0))[2]["r_fidelity"]
    assert float(b) < float(a)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.rewards=[semantic, beauty]"], "objective.rewards must list"),
        (["objective.rewards=[]"], "objective.rewards must list"),
        (["objective.semantic=cls"], "objective.semantic must be one of"),
        (["objective.fidelity=exact"], "objective.fidelity must be one of"),
        (["objective.perceptual=clip"], "objective.perceptual must be one of"),
        (["objective.layers=late"], "objective.layers must be one of"),
        (["objective.delta=0"], "objective.delta"),
        (["objective.stability_fraction=0"], "objective.stability_fraction"),
        (["objective.stats_decay=1.0"], "objective.stats_decay"),
        (["objective.fidelity_floor=1"], "objective.fidelity_floor"),
        (["objective.lambda_min=0"], "lambda_min"),
        (["objective.weighting=fixed", "objective.weight_semantic=-1"], "objective.weight_"),
        (["objective.adv_temperature=0"], "adv_temperature"),
        (["objective.pathwise=false", "objective.policy=false"], "both off"),
        (["objective.group_size=3"], "does not divide"),
        (["objective.group_size=2", "objective.policy=false"], "policy"),
        (["objective.layers=early", "objective.encoder_depth=2"], "set by objective.layers"),
        (["objective.layer_projectors=per_block"], "needs objective.layers=all"),
        (["objective.perceptual=lpips", "objective.rewards=[semantic]"], "part of the fidelity reward"),
        (["objective.perceptual=lpips", "data.name=tensors", "objective.feature_cache=cache"], "latent data"),
        (["objective.perceptual=lpips", "transport.prediction=noise", "sampler.t_start=0.99"], "x0_hat"),
        (["objective.grad_share_every=-1"], "grad_share_every"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        vrpo_config(*overrides)
    assert "\n" not in str(err.value)


def test_build_errors_are_one_line(base, monkeypatch):
    data, model, _, _ = base
    with pytest.raises(ConfigError, match="fidelity=full needs more rows") as err:
        build(model, data, "objective.fidelity=full")
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed (it is not here either)
    with pytest.raises(RuntimeError, match="perceptual=lpips needs the lpips package") as err:
        build(model, data, "objective.perceptual=lpips")
    assert "\n" not in str(err.value)


def test_plot_vrpo(tmp_path):
    records = [
        {"step": s, "lambda_s": 0.5 + 0.01 * s, "w_semantic": 0.5, "w_stability": 0.2, "w_fidelity": 0.3}
        for s in range(0, 50, 10)
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_vrpo(tmp_path)
    assert out == tmp_path / "vrpo_weights.png" and out.stat().st_size > 0
    assert plot_vrpo(tmp_path / "empty") is None


@pytest.mark.parametrize("spec", [1, 2])
def test_resumed_vrpo_run_is_bit_identical(tmp_path, spec):
    """Stopped at a checkpoint and resumed, a VRPO run (statistics included) matches a straight run,
    under either version of the spec."""
    from safetensors.torch import load_file

    from vrpo.config import load_config
    from vrpo.runs.checkpoint import step_dirs
    from vrpo.train import train

    base = [
        "data.name=digits",
        "data.limit=40",
        "model.arch=SiT-T/8",
        "train.batch_size=8",
        "train.threads=1",
        "train.progress=false",
        "train.tensorboard=false",
        "sampler.steps=2",
        "train.sample_grid=4",
        "objective.projector_width=64",
        "objective.encoder_input_size=64",
        "objective.feature_cache=null",
        "objective.warmup_steps=2",
        "objective.grad_share_every=2",
        f"objective.spec={spec}",
        "train.ckpt_every=3",
        "train.log_every=1",
    ]

    def cfg(steps):
        return load_config("configs/fmnist/vrpo-t2.yaml", [*base, f"train.max_steps={steps}"])

    train(cfg(6), tmp_path / "straight")
    train(cfg(3), tmp_path / "resumed")
    train(cfg(6), tmp_path / "resumed")
    for name in ("model", "ema", "objective", "optimizer"):
        a = load_file(str(step_dirs(tmp_path / "straight")[0] / f"{name}.safetensors"))
        b = load_file(str(step_dirs(tmp_path / "resumed")[0] / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    assert (tmp_path / "straight/vrpo_weights.png").is_file()
    for run in ("straight", "resumed"):
        path = tmp_path / run / "warnings.jsonl"
        warned = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        if spec == 1:  # after the 2-step warm-up the near-constant stability reward takes the weight
            assert [w["key"] for w in warned] == ["dominant_weight"] and warned[0]["step"] >= 2  # once per run
        else:  # bounded weights: no reward takes the weight
            assert warned == []


def test_a_dominant_inverse_variance_weight_is_warned(base):
    data, model, _, _ = base
    record = {
        "w_semantic": 0.0001,
        "w_stability": 0.998,
        "w_fidelity": 0.0019,
        "r_semantic_var": 1e-3,
        "r_stability_var": 2e-7,
        "r_fidelity_var": 1e-4,
    }
    found = build(model, data).warnings(record)
    assert list(found) == ["dominant_weight"] and "stability reward 99.8%" in found["dominant_weight"]
    assert "\n" not in found["dominant_weight"] and "stability 2.0e-07" in found["dominant_weight"]
    assert build(model, data).warnings({**record, "w_stability": 0.6, "w_semantic": 0.3998}) == {}
    assert build(model, data, "objective.weighting=fixed").warnings(record) == {}
    assert build(model, data, "objective.rewards=[semantic]").warnings({"w_semantic": 1.0}) == {}


def test_early_layers_that_resolve_to_the_default_block_are_warned(base):
    data, model, _, _ = base  # depth 6: early = round(3 * 6 / 8) = 2, REPA's default block here
    found = build(model, data, "objective.layers=early", "objective.weighting=fixed").warnings({})
    assert list(found) == ["layers_is_block"] and "block 2 at depth 6" in found["layers_is_block"]
    for layers in ("block", "mid", "all"):
        assert build(model, data, f"objective.layers={layers}", "objective.weighting=fixed").warnings({}) == {}
