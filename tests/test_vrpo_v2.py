"""VRPO version 2 (../shared/docs/vrpo.md): centred stability, bounded shrinkage of the weights,
lambda from the prior-weight variance, the pathwise term on the rewards' own scale, the
per-timestep baseline, group draws sharing t, the logged coefficients; Prop. 2 and `spec: 1`."""

from pathlib import Path

import pytest
import torch
import yaml

from test_vrpo import SMALL, assert_matches_repa, block_grads
from vrpo.config import load_config
from vrpo.data import step_generator
from vrpo.objectives import build_objective
from vrpo.objectives.vrpo.options import SPEC_DEFAULTS
from vrpo.objectives.vrpo.statistics import bounded_weights

V2 = [o for o in SMALL if not o.startswith("objective.spec")]


def build(model, data, *extra):
    torch.manual_seed(1)
    return build_objective(load_config("configs/fmnist/vrpo-t2.yaml", [*V2, *extra]), model, data)


def feed(vrpo, comps, samples, t=None):
    """One committed step of synthetic statistics (real features: zeros; t: bins of the baseline)."""
    real = [torch.zeros(samples.shape[1], e.token_dim) for e in vrpo.alignment.encoders]
    total = vrpo.weights().double() @ samples.double()
    bins = None
    if vrpo.bins:
        t = torch.rand(samples.shape[1]) if t is None else t
        bins = (t * vrpo.bins).long().clamp(0, vrpo.bins - 1)
    vrpo.record(comps, samples, total, real if "fidelity" in vrpo.rewards else [], bins)
    vrpo.end_of_step(int(vrpo.steps_done), True)


def test_spec_selects_every_choice_and_explicit_options_win(base):
    data, model, _, _ = base
    v2, v1 = build(model, data).options, build(model, data, "objective.spec=1").options
    for key, value in SPEC_DEFAULTS[2].items():
        assert getattr(v2, key) == value and getattr(v1, key) == SPEC_DEFAULTS[1][key], key
    mixed = build(model, data, "objective.spec=1", "objective.stability_centering=true").options
    assert mixed.stability_centering is True and mixed.weight_shrinkage == 1.0
    with pytest.raises(ValueError, match="objective.spec must be one of"):
        build(model, data, "objective.spec=3")
    with pytest.raises(ValueError, match="admit no weights"):
        build(model, data, "objective.weight_bounds=[0.4, 0.6]")


@pytest.mark.parametrize("kind", ["constant", "position"])
def test_a_projector_that_ignores_its_input_scores_zero_stability(base, kind):
    data, model, _, batch = base
    vrpo = build(model, data, "objective.rewards=[semantic, stability]", "objective.stability_fraction=1.0")
    uncentred = build(model, data, "objective.rewards=[semantic, stability]", "objective.spec=1")
    n_tokens, dim = model.num_tokens, vrpo.alignment.encoders[0].token_dim
    pattern = torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(0))

    def ignore_input(hidden):
        out = pattern if kind == "position" else pattern[:1].expand(n_tokens, -1)
        return out.expand(hidden.shape[0], -1, -1) + 0 * hidden.sum()

    for objective in (vrpo, uncentred):
        objective.alignment.projectors[0].forward = ignore_input
        _, _, logs = objective.terms(model, batch, step_generator(0, 0))
        objective.end_of_step(0, True)
        objective._pending = []
    assert float(vrpo.terms(model, batch, step_generator(0, 1))[2]["r_stability"]) == pytest.approx(0.0, abs=1e-6)
    assert float(uncentred.terms(model, batch, step_generator(0, 1))[2]["r_stability"]) == pytest.approx(1.0)


def test_weights_stay_within_their_bounds_for_any_variances(base):
    data, model, _, _ = base
    vrpo = build(model, data, "objective.warmup_steps=2")
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-12, 1e-6, 1.0, 1e3):
        for _ in range(4):
            sigma = scale * 10 ** (4 * torch.rand(3, generator=gen, dtype=torch.float64) - 2)
            comps = torch.tensor([0.3, 0.9, -1.0]) + sigma * torch.randn(3, generator=gen)
            feed(vrpo, comps, comps[:, None] + sigma[:, None] * torch.randn(3, 8, generator=gen))
            w = vrpo.weights()
            assert float(w.sum()) == pytest.approx(1.0) and bool(((w >= 0.1 - 1e-12) & (w <= 0.6 + 1e-12)).all())
    # the direction of Prop. 4 survives: the lowest-variance reward has the largest weight
    vrpo = build(model, data, "objective.warmup_steps=2")
    for _ in range(300):
        comps = torch.tensor([0.3, 0.9, -1.0]) + torch.tensor([0.3, 0.001, 0.1]) * torch.randn(3, generator=gen)
        feed(vrpo, comps, comps[:, None] + 0.01 * torch.randn(3, 8, generator=gen))
    w = vrpo.weights()
    assert int(w.argmax()) == vrpo.rewards.index("stability")
    assert float(w.max()) == pytest.approx(0.75 * 0.2 + 0.25, abs=0.01)  # (1 - alpha) w0 + alpha u, u ~ 1
    g = torch.Generator().manual_seed(1)
    for _ in range(2000):
        raw = torch.rand(int(torch.randint(2, 4, (1,), generator=g)), generator=g, dtype=torch.float64) ** 8
        w = bounded_weights(raw / raw.sum(), 0.1, 0.6)
        assert abs(float(w.sum()) - 1) < 1e-12 and float(w.min()) >= 0.1 - 1e-15 and float(w.max()) <= 0.6 + 1e-15


def test_lambda_is_unmoved_by_a_change_of_adaptive_weights_alone(base):
    data, model, _, _ = base
    vrpo = build(model, data, "objective.warmup_steps=10")
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        comps = torch.tensor([0.3, 0.9, -1.0]) + 0.05 * torch.randn(3, generator=gen)
        feed(vrpo, comps, comps[:, None] + 0.1 * torch.randn(3, 8, generator=gen))
        if step + 1 == 10:  # the reference: the mean of v_P over the last tenth of warm-up (its step 10 here)
            v10 = float(vrpo.prior_variance())
    assert float(vrpo.v_R_ref) == pytest.approx(v10, rel=1e-12) and float(vrpo.ref_accumulator[1]) == 1
    before = float(vrpo.lambda_s(vrpo.prior_variance()))
    vrpo.options.weight_shrinkage = 1.0  # the adaptive weights move...
    vrpo.options.weight_bounds = [0.0, 1.0]
    moved = vrpo.weights()
    assert float((moved - vrpo.prior_weights()).abs().max()) > 0.1
    assert float(vrpo.lambda_s(vrpo.prior_variance())) == before  # ...lambda does not
    # version 1 takes lambda from v_R under today's weights: it moves with them
    v1 = build(model, data, "objective.warmup_steps=10", "objective.lambda_variance=total")
    for _ in range(40):
        comps = torch.tensor([0.3, 0.9, -1.0]) + 0.05 * torch.randn(3, generator=gen)
        feed(v1, comps, comps[:, None] + torch.tensor([[0.01], [0.2], [0.05]]) * torch.randn(3, 8, generator=gen))
    a = float(v1.lambda_s(v1.total_stats(v1.prior_weights())[1]))
    b = float(v1.lambda_s(v1.total_stats(v1.weights())[1]))
    assert a != pytest.approx(b, rel=1e-3)


def test_semantic_only_v2_reproduces_repa_loss_and_gradients(base):
    """Prop. 2 under version 2's defaults (centred stability, prior-variance lambda, pathwise on the
    rewards' scale, timestep baseline): one reward, fixed lambda, no policy = REPA, to 1e-6."""
    data, model, repa, batch = base
    vrpo = build(model, data, "objective.rewards=[semantic]", "objective.adaptive_lambda=false",
                 "objective.policy=false", "objective.lambda_0=0.5", "objective.warmup_steps=1")  # fmt: skip
    assert_matches_repa(vrpo, repa, model, batch)


def test_pathwise_term_is_lambda_w_times_the_rewards_and_coefficients_are_logged(base):
    data, model, _, batch = base
    vrpo = build(model, data)
    model.zero_grad(set_to_none=True)
    denoise, align, logs = vrpo.terms(model, batch, step_generator(0, 0))
    (denoise + align).backward()
    w = vrpo.weights()
    expected = -sum(vrpo.options.lambda_0 * float(w[j]) * float(logs[f"r_{k}"]) for j, k in enumerate(vrpo.rewards))
    assert float(align.detach()) == pytest.approx(expected, rel=1e-5)
    for j, k in enumerate(vrpo.rewards):
        assert float(logs[f"coef_{k}"]) == pytest.approx(vrpo.options.lambda_0 * float(w[j]), rel=1e-6)
    assert -1.0 <= float(logs["pw_t_corr"]) <= 1.0
    assert all(block_grads(model))
    model.zero_grad(set_to_none=True)
    # what the study reports: the logged coefficients, and the same from lambda_s and w_k where a log lacks them
    record = {k: float(v) for k, v in logs.items()}
    assert vrpo.options.alignment_coefficients(record) == {k: record[f"coef_{k}"] for k in vrpo.rewards}
    derived = vrpo.options.alignment_coefficients({k: v for k, v in record.items() if not k.startswith("coef_")})
    assert derived == pytest.approx({k: record[f"coef_{k}"] for k in vrpo.rewards}, rel=1e-6)
    no_pathwise = build(model, data, "objective.pathwise=false").options  # the rewards then reach only the heads
    assert no_pathwise.alignment_coefficients(record) == dict.fromkeys(vrpo.rewards, 0.0)
    # what those coefficients are made of, for the report's plot of them over training
    schedule = vrpo.options.alignment_schedule(record)
    expected = {"lambda_s": record["lambda_s"], **{f"w_{k}": float(w[j]) for j, k in enumerate(vrpo.rewards)}}
    assert schedule == pytest.approx(expected, rel=1e-6)
    assert vrpo.options.alignment_schedule({"step": 1}) == {}


def test_runs_saved_before_version_2_read_as_version_1():
    """An archived main-comparison run (saved with no objective.spec) keeps version 1's meaning: its
    semantic coefficient lambda_s w_sem / sqrt(v_R) is the ~4.35 of the issue, not v2's lambda_s w_sem."""
    from vrpo.runs import load_run_config, read_log

    folder = Path("docs/results/regime-t4-lr1e-3-1200/vrpo-tuned/seed0")
    assert "spec" not in yaml.safe_load((folder / "config.yaml").read_text())["objective"]
    options = load_run_config(folder).objective
    assert options.spec == 1 and options.standardize_pathwise and options.stability_fraction == 1.0
    last = read_log(folder / "log.jsonl")[-1]
    assert options.alignment_coefficients(last)["semantic"] == pytest.approx(4.35, abs=0.2)
    v2 = load_run_config("docs/results/v2-tuning-t4-lr1e-3-1200/vrpo-v2-2/seed10").objective
    assert v2.spec == 2 and not v2.standardize_pathwise


def test_advantages_are_taken_against_the_baseline_of_their_timestep(base):
    data, model, _, _ = base
    vrpo = build(model, data, "objective.rewards=[semantic]", "objective.timestep_bins=2")
    t = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    for _ in range(200):  # R = 1 at low t, 0 at high t, a little noise
        r = (t < 0.5).double() + 0.01 * torch.randn(8, dtype=torch.float64)
        feed(vrpo, r.mean()[None], r[None].float(), t)
    bins = (t * 2).long()
    mean, var = vrpo.timestep_baseline(bins, torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0))
    torch.testing.assert_close(mean, (t < 0.5).double(), atol=0.01, rtol=0)
    assert float(var.max()) < 1e-3
    # a sample that is average for its t has advantage ~0, however its R compares with other t
    from vrpo.objectives.vrpo.rewards import advantages

    a = advantages((t < 0.5).double(), mean, var, vrpo.options)
    assert float(a.abs().max()) < 1.0


def test_group_draws_share_their_time(base):
    data, model, _, batch = base
    grouped = build(model, data, "objective.group_size=2")
    rows, _ = grouped.grouped(batch)
    step = grouped.denoise(model, rows, step_generator(0, 0), time_groups=grouped.time_groups)
    t = step.t.view(-1, 2)
    assert torch.equal(t[:, 0], t[:, 1]) and not torch.equal(step.noise[0::2], step.noise[1::2])
    v1 = build(model, data, "objective.group_size=2", "objective.spec=1")
    t1 = v1.denoise(model, rows, step_generator(0, 0), time_groups=v1.time_groups).t.view(-1, 2)
    assert not torch.equal(t1[:, 0], t1[:, 1])  # version 1: independent t within a group


def test_evaluations_read_the_block_the_rewards_use(base):
    data, model, _, _ = base
    mid = build(model, data, "objective.layers=mid")
    assert mid.layers == [model.depth // 2] and mid.alignment.depth == model.depth // 2  # RA reads block 3, not 2
    assert build(model, data).alignment.depth == 2  # the default block (a third of T's 6)
