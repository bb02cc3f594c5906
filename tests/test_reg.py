"""REG: the network denoises the encoder's global token beside the image; its sequence gains one
token, the token's loss has its own weight, and it is sampled (and guided) jointly with the image."""

import pytest
import torch

from test_models import randomize
from test_objective_contract import build, config, loss_and_grads
from vrpo.config import load_config
from vrpo.data import step_generator
from vrpo.errors import ConfigError
from vrpo.models import build_model
from vrpo.objectives import build_objective
from vrpo.objectives.cosine import token_cosine
from vrpo.transport import generate
from vrpo.transport.samplers import GuidedPrediction

pytest.importorskip("efficientnet_lite_pytorch")


def test_the_sequence_gains_one_token_that_the_patches_attend_to():
    plain = randomize(build_model("SiT-T/8", 32, 1, 10, depth=2))
    model = randomize(build_model("SiT-T/8", 32, 1, 10, depth=2, global_token_dim=12))
    x, t, y = torch.randn(3, 1, 32, 32), torch.rand(3), torch.tensor([0, 1, 2])
    token = torch.randn(3, 12)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, inputs, out: seen.append(out.shape))
    out = model(x, t, y, hidden_layers=(1, 2), global_token=token)
    assert seen == [torch.Size([3, 1 + model.num_tokens, model.hidden_size])]
    assert out.hidden[2].shape == (3, model.num_tokens, model.hidden_size)  # the patches alone
    assert out.hidden_global[2].shape == (3, model.hidden_size) and out.global_prediction.shape == (3, 12)
    assert out.prediction.shape == plain(x, t, y).prediction.shape
    other = model(x, t, y, global_token=token + 1.0)
    assert not torch.allclose(other.prediction, out.prediction)  # entangled: the image reads the token
    with pytest.raises(ValueError, match="global token of width 12"):
        model(x, t, y)
    with pytest.raises(ValueError, match="no global token"):
        plain(x, t, y, global_token=token)


def test_the_same_seed_starts_from_the_same_network_and_the_token_output_at_zero():
    torch.manual_seed(5)
    plain = build_model("SiT-T/8", 32, 1, 10)
    torch.manual_seed(5)
    reg = build_model("SiT-T/8", 32, 1, 10, global_token_dim=16)
    shared = plain.state_dict()
    for key, value in reg.state_dict().items():
        if key in shared:
            assert torch.equal(value, shared[key]), key
    assert reg.final_layer.linear_global.weight.abs().sum() == 0


def test_config_sets_the_token_width_from_the_encoder_and_refuses_another():
    assert config("reg", "flow").model.global_token_dim == 1280  # EfficientNet-Lite0's pooled features
    with pytest.raises(ConfigError, match="must be its width 1280, got 64"):
        config("reg", "flow", "model.global_token_dim=64")
    with pytest.raises(ConfigError, match="trains flow"):
        config("reg", "ddpm")
    assert load_config(None, ["objective={name: reg, encoders: [dinov2-vitb14]}"]).model.global_token_dim == 768


def test_loss_is_denoise_plus_weighted_token_loss_plus_alignment():
    cfg, model, reg, batch = build("reg", "flow")
    out, grads = loss_and_grads(model, reg, batch, step_generator(0, 0))
    step = reg.denoise(model, batch, step_generator(0, 0), global_token=reg.alignment.encoder_outputs(batch)[0][1])
    align = -reg.similarity(step, reg.alignment.encoder_outputs(batch)).mean()
    expected = step.per_sample_loss.mean() + 0.03 * step.global_loss.mean() + cfg.objective.proj_coeff * align
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(out.logs["loss_global"]) == pytest.approx(float(step.global_loss.mean().detach()), rel=1e-6)
    assert grads["final_layer.linear_global.weight"].abs().sum() > 0  # the token's loss trains its head
    # the weight applies to the token's loss alone: the difference of two weights is exactly that loss
    heavy = build_objective(config("reg", "flow", "objective.global_weight=1.03"), model)
    heavy.alignment.projectors.load_state_dict(reg.alignment.projectors.state_dict())
    difference = heavy.loss(model, batch, step_generator(0, 0)).loss - out.loss.detach()
    assert float(difference.detach()) == pytest.approx(float(step.global_loss.mean().detach()), rel=1e-5)
    # the token is noised with the image's t and the interpolant, from the draw after the image's:
    # x_t = (1 - t) g + t eps
    generator = step_generator(0, 0)
    t = reg.noising.draw_times(8, generator, "cpu")
    torch.randn(batch.x.shape, generator=generator), torch.rand(8, generator=generator)  # noise, label dropout
    g = reg.alignment.encoder_outputs(batch)[0][1]
    eps = torch.randn(g.shape, generator=generator)
    torch.testing.assert_close(step.global_t, (1 - t[:, None]) * g + t[:, None] * eps)


def test_align_global_counts_the_token_as_one_more_position():
    _, model, _, batch = build("reg", "flow")
    reg = build_objective(config("reg", "flow", "objective.align_global=true"), model)
    outputs = reg.alignment.encoder_outputs(batch)
    step = reg.denoise(model, batch, step_generator(0, 0), global_token=outputs[0][1])
    d = reg.alignment.depth
    patches = reg.alignment.cosine(reg.alignment.project(step.hidden[d]), reg.alignment.on_model_grid(outputs))
    token = token_cosine(reg.alignment.projectors[0](step.hidden_global[d]), outputs[0][1])
    n = model.num_tokens
    torch.testing.assert_close(reg.similarity(step, outputs), (n * patches + token) / (n + 1))


def test_sampling_denoises_the_token_jointly_and_guidance_covers_it():
    cfg = config("reg", "flow", "sampler.method=euler", "sampler.steps=3", "sampler.cfg_scale=2.0")
    model = randomize(build_model("SiT-T/8", 32, 1, 10, global_token_dim=6)).eval()
    y = torch.tensor([1, 2])
    noise = torch.randn(2, 1, 32, 32)
    generator = torch.Generator().manual_seed(3)
    sampled = generate(model, cfg, y, noise, generator)
    # by hand: the token's noise is the generator's next draw; Euler on both; guidance on both
    token = torch.randn((2, 6), generator=torch.Generator().manual_seed(3))
    x = noise
    null = torch.full_like(y, model.null_class)
    for t, t_next in ((1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)):
        net_t = torch.full((2,), t) * 1000
        cond, uncond = model(x, net_t, y, global_token=token), model(x, net_t, null, global_token=token)
        v = uncond.prediction + 2.0 * (cond.prediction - uncond.prediction)
        v_token = uncond.global_prediction + 2.0 * (cond.global_prediction - uncond.global_prediction)
        x, token = x + (t_next - t) * v, token + (t_next - t) * v_token
    torch.testing.assert_close(sampled, x, atol=1e-5, rtol=1e-5)
    # the token's own scale: 1 leaves it conditional
    guided = GuidedPrediction(model, y, None, cfg_scale=2.0, global_cfg_scale=1.0)
    net_t = torch.full((2,), 0.5)
    out = guided.output(noise, net_t, global_token=token)
    cond = model(noise, net_t * 1000, y, global_token=token)
    torch.testing.assert_close(out.global_prediction, cond.global_prediction, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out.prediction, cond.prediction)


@pytest.mark.parametrize("layers", ["block", "mid"])
def test_vrpo_with_regs_token_adds_its_weighted_loss_and_feeds_every_pass(layers):
    _, model, _, batch = build("reg", "flow")  # a network with the 1280-wide token
    options = ("objective.global_token=true", f"objective.layers={layers}")
    light, heavy = (
        build_objective(config("vrpo", "flow", *options, f"objective.global_weight={w}"), model) for w in (0.03, 1.03)
    )
    heavy.load_state_dict(light.state_dict())
    record = {"lambda_s": 0.5, **{f"coef_{k}": 0.1 for k in light.rewards}}
    assert light.options.alignment_coefficients(record)["global_token"] == 0.03
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda m, inputs, out: seen.append(out.shape[1]))
    with torch.no_grad():  # no statistics update: both see the same state
        a, b = (o.loss(model, batch, step_generator(0, 0)) for o in (light, heavy))
    hook.remove()
    assert set(seen) == {1 + model.num_tokens}  # the main pass, the stability pass (and mid's branch) carry it
    assert len(seen) == 2 * (3 if layers == "mid" else 2)  # two objectives, each its passes
    assert float(b.loss - a.loss) == pytest.approx(float(a.logs["loss_global"]), rel=1e-5)


def test_vrpo_with_the_token_trains_and_samples(tmp_path):
    from vrpo.train import train

    cfg = config("vrpo", "flow", "objective.global_token=true", "train.max_steps=2", "train.ckpt_every=2")
    assert cfg.model.global_token_dim == 1280
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "samples" / "step_00000002.png").exists()
    with pytest.raises(ConfigError, match="objective repa does not feed it"):
        config("repa", "flow", "model.global_token_dim=1280")
