"""DeepFlow: branches with their own velocity heads and times, VeRA between them; each head
receives its own loss term, and the acceleration head the second-order step's."""

import pytest
import torch

from test_models import randomize
from test_objective_contract import build, config, loss_and_grads
from vrpo.data import step_generator
from vrpo.errors import ConfigError
from vrpo.models import build_model
from vrpo.objectives import build_objective


def test_the_network_has_a_head_per_branch_and_samples_from_the_last():
    torch.manual_seed(4)
    plain = build_model("SiT-T/8", 32, 1, 10)
    torch.manual_seed(4)
    model = build_model("SiT-T/8", 32, 1, 10, branch_blocks=[2, 4])
    shared = plain.state_dict()
    assert all(torch.equal(v, shared[k]) for k, v in model.state_dict().items() if k in shared)  # same start
    model = randomize(model)
    x, t, y = torch.randn(2, 1, 32, 32), torch.rand(2) * 1000, torch.tensor([3, 4])
    out = model(x, t, y, hidden_layers=(5,))
    assert len(out.branch_predictions) == len(out.accelerations) == 2 and 5 in out.hidden
    same = model(x, t, y, branch_times=[t, t, t])
    torch.testing.assert_close(same.prediction, out.prediction, rtol=0, atol=0)
    other = model(x, t, y, branch_times=[t, t + 50, t + 100])
    torch.testing.assert_close(other.branch_predictions[0], out.branch_predictions[0], rtol=0, atol=0)
    assert not torch.allclose(other.prediction, out.prediction)  # later branches read their own times
    with pytest.raises(ValueError, match="3 branch times"):
        model(x, t, y, branch_times=[t, t])


def test_each_head_receives_its_own_loss_and_the_loss_is_the_formula():
    cfg, model, deepflow, batch = build("deepflow", "flow")
    assert cfg.model.branch_blocks == [3]  # 2 branches of SiT-T's 6 blocks
    randomize(model, 1)
    out, grads = loss_and_grads(model, deepflow, batch, step_generator(0, 0))
    for name in ("branch_head.linear.weight", "acceleration_head.linear.weight", "refiners.0.cross.in_proj_weight"):
        assert grads[name].abs().sum() > 0, name
    # replay the draws: t, noise, label dropout, then the sign and the gaps
    gen = step_generator(0, 0)
    t = deepflow.noising.draw_times(8, gen, "cpu")
    noise = torch.randn(batch.x.shape, generator=gen)
    labels = torch.where(torch.rand(8, generator=gen) < cfg.train.label_dropout, 10, batch.labels)
    sign = 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0
    t1 = (t + sign * torch.rand(8, generator=gen) * 0.01).clamp(0, 1)
    assert ((t1 - t).abs() <= 0.01 + 1e-7).all()
    s = t.view(-1, 1, 1, 1)
    x_t = (1 - s) * batch.x + s * noise
    net = model(x_t, t * 1000, labels, branch_times=[t * 1000, t1 * 1000])
    target = noise - batch.x
    v0, a0 = net.branch_predictions[0], net.accelerations[0]
    velocity = 0.2 * (v0 - target).pow(2).mean() + 1.0 * (net.prediction - target).pow(2).mean()
    acceleration = (x_t - s * v0 + 0.5 * a0 * s**2 - batch.x).pow(2).mean()
    assert float(out.loss.detach()) == pytest.approx(float((velocity + acceleration).detach()), rel=1e-5)
    # without its weight a head gets nothing: the gradient of each comes from its own term
    alone = build_objective(config("deepflow", "flow", "objective.branch_weights=[0.0, 1.0]",
                                   "objective.acceleration_weight=0.0"), model)  # fmt: skip
    _, only_final = loss_and_grads(model, alone, batch, step_generator(0, 0))
    assert only_final["branch_head.linear.weight"].abs().sum() == 0
    assert (
        only_final["acceleration_head.linear.weight"] is None
        or only_final["acceleration_head.linear.weight"].abs().sum() == 0
    )


def test_config_sets_the_branches_and_refuses_what_cannot_work():
    assert config(
        "deepflow", "flow", "objective.branches=3", "objective.branch_weights=[0.2, 0.2, 1.0]"
    ).model.branch_blocks == [2, 4]
    with pytest.raises(ConfigError, match="must be \\[3\\], got \\[2\\]"):
        config("deepflow", "flow", "model.branch_blocks=[2]")
    with pytest.raises(ConfigError, match="linear interpolant"):
        config("deepflow", "flow", "transport.interpolant=cosine")
    with pytest.raises(ConfigError, match="does not feed it"):
        config("sit", "flow", "model.branch_blocks=[3]")
