"""The REPA family's defining properties: alignment schedules (HASTE's stop among them),
LayerSync's stop-gradient target, the dispersive loss, iREPA's targets and projector."""

import math

import pytest
import torch

from test_objective_contract import build, config, loss_and_grads
from vrpo.data import step_generator
from vrpo.objectives import build_objective
from vrpo.objectives.alignment import spatial_normalize
from vrpo.objectives.dispersive import dispersive_loss

pytest.importorskip("efficientnet_lite_pytorch")


def test_schedules_scale_the_weight_and_a_stop_gives_sits_loss_exactly():
    options = config("repa", "flow", "objective.schedule=stop", "objective.schedule_end=3").objective
    assert [options.alignment_scale(s) for s in (0, 2, 3, 10)] == [1.0, 1.0, 0.0, 0.0]
    linear = config("repa", "flow", "objective.schedule=linear", "objective.schedule_end=4").objective
    cosine = config("repa", "flow", "objective.schedule=cosine", "objective.schedule_end=4").objective
    assert [linear.alignment_scale(s) for s in (0, 1, 4, 9)] == [1.0, 0.75, 0.0, 0.0]
    assert cosine.alignment_scale(2) == pytest.approx(0.5) and cosine.alignment_scale(4) == pytest.approx(0.0)
    cfg, model, repa, batch = build("repa", "flow")
    stopped = build_objective(config("repa", "flow", "objective.schedule=stop", "objective.schedule_end=3"), model)
    sit = build_objective(config("sit", "flow"), model)
    for objective in (stopped, sit):
        objective.start_of_step(3)
    after, sit_loss = (o.loss(model, batch, step_generator(0, 3)).loss for o in (stopped, sit))
    assert torch.equal(after, sit_loss)
    stopped.start_of_step(2)
    before = stopped.loss(model, batch, step_generator(0, 3)).loss
    assert not torch.equal(before, sit_loss)
    assert stopped.options.alignment_coefficients({"step": 4}) == {"semantic": 0.0}
    assert stopped.options.alignment_coefficients({"step": 3}) == {"semantic": cfg.objective.proj_coeff}


def test_a_stopped_vrpo_schedule_zeroes_its_pathwise_term():
    _, model, _, batch = build("vrpo", "flow")
    vrpo = build_objective(config("vrpo", "flow", "objective.schedule=stop", "objective.schedule_end=1"), model)
    vrpo.start_of_step(1)
    _, align, logs = vrpo.terms(model, batch, step_generator(0, 0))
    assert float(align.detach()) == 0.0 and all(float(logs[f"coef_{k}"]) == 0.0 for k in vrpo.rewards)


def test_layersync_target_is_stop_gradient():
    _, model, objective, batch = build("layersync", "flow")
    source, target = objective.source, objective.target
    assert (source, target) == (2, 3)  # 8/28 and 16/28 of SiT-T's 6 blocks
    step = objective.denoise(model, batch, step_generator(0, 0))
    align = (
        -objective.options.weight
        * torch.nn.functional.cosine_similarity(step.hidden[source], step.hidden[target].detach(), dim=-1).mean()
    )
    full, _ = loss_and_grads(model, objective, batch, step_generator(0, 0))
    assert float(full.loss.detach()) == pytest.approx(float((step.per_sample_loss.mean() + align).detach()), rel=1e-5)
    model.zero_grad(set_to_none=True)
    align.backward()
    blocks = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in model.blocks]
    assert blocks[:source] == [True] * source and not any(blocks[source:])  # the target's blocks get nothing


def test_dispersive_loss_is_the_b2_log_mean_exp_and_pushes_samples_apart():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, 8, generator=g, requires_grad=True)
    z = h.flatten(1)
    pairs = torch.stack([torch.exp(-((z[i] - z[j]) ** 2).mean() / 0.5) for i in range(6) for j in range(6)])
    value = dispersive_loss(h, 0.5)
    assert float(value) == pytest.approx(math.log(float(pairs.mean())), rel=1e-5)
    value.backward()
    assert torch.isfinite(h.grad).all()
    spread = torch.pdist(z.detach()).mean()
    assert torch.pdist((h - 0.5 * h.grad).flatten(1).detach()).mean() > spread  # descent repels
    spread_out = [float(dispersive_loss(scale * h.detach(), 0.5)) for scale in (0.5, 1.0, 2.0)]
    assert spread_out[0] > spread_out[1] > spread_out[2]  # the term falls as the states spread
    _, _, objective, _ = build("dispersive", "flow")
    assert objective.alignment is None and objective.hidden_layers() == (1,)  # block depth // 4 of 6


def test_irepa_targets_are_spatially_normalised_and_its_projector_sees_neighbours():
    g = torch.Generator().manual_seed(1)
    tokens = 3.0 + 2.0 * torch.randn(2, 16, 5, generator=g)
    full = spatial_normalize(tokens, 1.0)
    assert full.mean(1).abs().max() < 1e-5 and (full.std(1) - 1).abs().max() < 1e-4
    assert torch.allclose(spatial_normalize(tokens, 0.6).std(1), full.std(1), atol=1e-5)  # alpha moves the mean
    _, model, irepa, batch = build("irepa", "flow")
    projector = irepa.alignment.projectors[0]
    grid = model.grid
    hidden = torch.randn(1, grid * grid, model.hidden_size, generator=g)
    moved = hidden.clone()
    moved[0, 0] += 1.0  # token (0, 0)
    changed = (projector(moved) - projector(hidden)).abs().sum(-1).view(grid, grid) > 0
    expected = torch.zeros(grid, grid, dtype=torch.bool)
    expected[:2, :2] = True  # its 3 x 3 neighbourhood, cut at the corner
    assert torch.equal(changed, expected)
    targets = irepa.alignment.targets(batch)[0]  # EfficientNet's: channels constant over positions become 0
    assert torch.isfinite(targets).all()
    constant = tokens.clone()
    constant[:, :, 2] = 7.0
    assert torch.equal(spatial_normalize(constant, 0.6)[:, :, 2], torch.zeros(2, 16))


def test_sra_teacher_is_the_ema_network_at_a_less_noisy_time_and_gets_no_gradient():
    from vrpo.train.ema import make_ema

    _, model, sra, batch = build("sra", "flow")
    assert (sra.source, sra.target) == (2, 4)  # 8/28 and 20/28 of 6 blocks
    ema = make_ema(model)
    sra.bind_ema(ema)
    times = []
    original = sra.noising.earlier
    sra.noising.earlier = lambda t, delta: times.append((t, out := original(t, delta))) or out
    first, grads = loss_and_grads(model, sra, batch, step_generator(0, 0))
    t, t_teacher = times[0]
    assert (t_teacher <= t).all() and (t - t_teacher <= 0.2 + 1e-6).all() and (t_teacher >= 0).all()
    assert all(p.grad is None for p in ema.parameters()) and grads["objective.head.0.weight"].abs().sum() > 0
    with torch.no_grad():
        for p in ema.blocks[0].parameters():
            p.add_(0.1)
    again, _ = loss_and_grads(model, sra, batch, step_generator(0, 0))
    assert not torch.equal(first.loss, again.loss)  # the target comes from the EMA weights
    sra.bind_ema(model)  # the online network as its own teacher: another target, the same student
    third, _ = loss_and_grads(model, sra, batch, step_generator(0, 0))
    assert not torch.equal(third.loss, again.loss)
