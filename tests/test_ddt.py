"""DDT: a condition encoder and a velocity decoder modulated token-wise by its output; at sampling,
the encoder's output is shared between evaluations (every k-th, or at DDT's optimal points)."""

import itertools

import pytest
import torch

from test_models import randomize
from test_objective_contract import config
from vrpo.errors import ConfigError
from vrpo.models import build_model
from vrpo.transport import generate
from vrpo.transport.interpolants import LinearInterpolant
from vrpo.transport.samplers import GuidedPrediction, sample_flow, time_grid
from vrpo.transport.sharing import EncoderSharing, optimal_schedule, sharing_costs


def ddt(seed=0):
    return randomize(build_model("SiT-T/8", 32, 1, 10, decoder_depth=2), seed).eval()


def test_the_decoder_is_modulated_token_wise_by_the_encoders_output():
    model = ddt()
    x, t, y = torch.randn(3, 1, 32, 32), torch.rand(3) * 1000, torch.tensor([0, 1, 2])
    seen = {}
    for index in (4, 5):  # encoder block 4, decoder block 5 of 6
        model.blocks[index - 1].ada.register_forward_hook(
            lambda m, i, o, k=index: seen.setdefault(k, i[0].shape) and None
        )
    out = model(x, t, y, hidden_layers=(4,))
    assert seen[4] == (3, model.hidden_size) and seen[5] == (3, model.num_tokens, model.hidden_size)
    torch.testing.assert_close(out.condition, out.hidden[4] + model.t_embedder(t)[:, None])
    # the decoder reads x_t through its own embedding: reusing the condition gives the same prediction
    again = model(x, t, y, condition=out.condition)
    torch.testing.assert_close(again.prediction, out.prediction, rtol=0, atol=0)
    other = model(x, t, y, condition=out.condition + 1.0)
    assert not torch.allclose(other.prediction, out.prediction)
    assert build_model("SiT-T/8", 32, 1, 10)(x, t, y).condition is None


def sample(model, every=1, recompute=None, steps=6, method="heun"):
    y = torch.tensor([1, 2])
    guided = GuidedPrediction(model, y, LinearInterpolant(), cfg_scale=2.0, interval=(0.0, 0.6))
    guided.sharing = EncoderSharing(recompute, every)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out = sample_flow(guided, noise, method, steps, generator=torch.Generator().manual_seed(2))
    return out, guided.sharing


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_sharing_every_evaluation_equals_no_sharing_and_a_period_runs_the_encoder_less(method):
    model = ddt()
    y = torch.tensor([1, 2])
    plain = GuidedPrediction(model, y, LinearInterpolant(), cfg_scale=2.0, interval=(0.0, 0.6))
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = sample_flow(plain, noise, method, 6, generator=torch.Generator().manual_seed(2))
    every, sharing = sample(model, 1, method=method)
    assert torch.equal(every, reference) and sharing.encoder_runs == sharing.evaluation
    listed, _ = sample(model, recompute=set(range(sharing.evaluation)), method=method)
    assert torch.equal(listed, reference)
    shared, half = sample(model, 2, method=method)
    assert half.encoder_runs == (sharing.evaluation + 1) // 2 and not torch.equal(shared, reference)
    assert (shared - reference).abs().max() < 0.5 * reference.abs().max()  # close, not equal


def test_the_dynamic_programme_finds_the_cheapest_recompute_points():
    torch.manual_seed(0)
    n = 7
    history = [torch.randn(2, 4, 8) + 2.0 * torch.randn(1, 1, 8) for _ in range(n)]
    costs = sharing_costs(history)
    # costs[j, i]: the summed cosine distance of evaluations j..i to evaluation j
    flat = [torch.nn.functional.normalize(h.double().flatten(0, 1), dim=-1) for h in history]
    manual = sum(1.0 - (flat[m] * flat[1]).sum(-1).mean() for m in range(1, 5))
    assert float(costs[1, 4]) == pytest.approx(float(manual))
    for count in (1, 2, 3, 5):
        points = optimal_schedule(costs, count)

        def total(chosen):
            starts = sorted(chosen)
            return sum(float(costs[s, e - 1]) for s, e in zip(starts, [*starts[1:], n]))

        best = min(({0, *rest} for rest in itertools.combinations(range(1, n), count - 1)), key=total)
        assert 0 in points and len(points) == count and total(points) == pytest.approx(total(best))


def test_optimal_sharing_through_the_config_and_the_configs_checks():
    model = ddt()
    cfg = config("repa", "flow", "model.decoder_depth=2", "sampler.method=euler", "sampler.steps=6")
    y, noise = torch.tensor([0, 1]), torch.randn(2, 1, 32, 32)
    every = generate(model, cfg, y, noise, torch.Generator().manual_seed(0))
    optimal = generate(model, cfg, y, noise, torch.Generator().manual_seed(0), encoder_sharing=3,
                       encoder_schedule="optimal")  # fmt: skip
    assert optimal.shape == every.shape and not torch.equal(optimal, every)
    with pytest.raises(ConfigError, match="block of DDT's condition encoder"):
        config("repa", "flow", "model.decoder_depth=5", "objective.encoder_depth=2")
    with pytest.raises(ConfigError, match="needs model.decoder_depth > 0"):
        config("repa", "flow", "sampler.encoder_sharing=2")
    assert time_grid(6).shape[0] == 7


def test_repa_on_ddt_trains_and_samples_with_sharing(tmp_path):
    from vrpo.runs.checkpoint import latest_checkpoint
    from vrpo.train import train

    settings = ("model.decoder_depth=2", "sampler.encoder_sharing=2", "train.ckpt_every=2", "train.max_steps=2")
    train(config("repa", "flow", *settings), tmp_path / "run")
    assert "decoder_embed.weight" in latest_checkpoint(tmp_path / "run").tensors["model"]
    assert (tmp_path / "run" / "samples" / "step_00000002.png").exists()  # sampled with the encoder shared
