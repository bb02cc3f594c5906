import pytest
import torch

from vrpo.models import build_model, model_names, parse_arch
from vrpo.models.transformer import sincos_pos_embed_2d


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_shape_per_patch_and_channels(patch, channels):
    model = build_model(f"SiT-T/{patch}", 16, channels, 10, hidden_size=32, depth=2, num_heads=2)
    x = torch.randn(2, channels, 16, 16)
    out = model(x, torch.rand(2) * 1000, torch.tensor([1, 2]))
    assert out.prediction.shape == x.shape
    assert model.num_tokens == (16 // patch) ** 2


def test_dit_learns_sigma_with_doubled_channels():
    model = build_model("DiT-T/4", 16, 3, 10, hidden_size=32, depth=2, num_heads=2)
    assert model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])).prediction.shape == (2, 6, 16, 16)


def test_sizes_by_name():
    widths = {"T": 192, "S": 384, "B": 768, "L": 1024, "XL": 1152}
    for size in widths:
        assert parse_arch(f"SiT-{size}/2") == ("SiT", size, 2)
    assert len(model_names()) == 2 * 5 * 4
    with pytest.raises(ValueError, match="unknown architecture"):
        parse_arch("SiT-M/2")
    with pytest.raises(ValueError, match="divisible"):
        build_model("SiT-T/8", 20, 1, 10)


def test_adaln_zero_init_predicts_zero():
    model = build_model("SiT-T/4", 16, 1, 10, hidden_size=32, depth=2, num_heads=2)
    out = model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert torch.count_nonzero(out.prediction) == 0


def test_conditioning_on_time_and_label():
    model = randomize(build_model("SiT-T/4", 16, 1, 10, hidden_size=32, depth=2, num_heads=2))
    x = torch.randn(1, 1, 16, 16)
    base = model(x, torch.tensor([500.0]), torch.tensor([3])).prediction
    assert not torch.allclose(base, model(x, torch.tensor([100.0]), torch.tensor([3])).prediction)
    assert not torch.allclose(base, model(x, torch.tensor([500.0]), torch.tensor([4])).prediction)
    assert not torch.allclose(base, model(x, torch.tensor([500.0]), None).prediction)  # null class


def test_unconditional_model_has_only_the_null_class():
    model = randomize(build_model("SiT-T/4", 16, 1, 0, hidden_size=32, depth=2, num_heads=2))
    assert model.y_embedder.table.num_embeddings == 1
    assert model(torch.randn(2, 1, 16, 16), torch.rand(2), None).prediction.shape == (2, 1, 16, 16)


def test_hidden_states_and_partial_pass():
    model = randomize(build_model("SiT-T/4", 16, 1, 10, hidden_size=32, depth=4, num_heads=2))
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2) * 1000, torch.tensor([0, 1])
    full = model(x, t, y, hidden_layers=[1, 3])
    assert set(full.hidden) == {1, 3} and full.hidden[3].shape == (2, 16, 32)
    partial = model(x, t, y, hidden_layers=[3], stop_after=3)
    assert partial.prediction is None
    torch.testing.assert_close(partial.hidden[3], full.hidden[3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside blocks"):
        model(x, t, y, hidden_layers=[5])


def test_cfg_scale_one_is_the_conditional_output_and_guides_all_channels():
    model = randomize(build_model("DiT-T/4", 16, 4, 10, hidden_size=32, depth=2, num_heads=2))
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3) * 1000, torch.tensor([0, 1, 2])
    cond = model(x, t, y).prediction
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0).prediction, cond)
    uncond = model(x, t, torch.full_like(y, model.null_class)).prediction
    guided = model.forward_with_cfg(x, t, y, 4.0).prediction
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:])  # learned-sigma channels stay conditional
    # a guidance interval switches guidance off per sample
    masked = model.forward_with_cfg(x, t, y, 4.0, guide=torch.tensor([True, False, True])).prediction
    torch.testing.assert_close(masked[1], cond[1], rtol=1e-5, atol=1e-5)


def test_position_embedding_is_fixed_sincos():
    pe = sincos_pos_embed_2d(8, 2, 2)
    assert pe.shape == (4, 8)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
