"""HASTE's attention term: the model's attention rows pulled by cross-entropy towards a ViT
encoder's, switched off with the alignment at the schedule's stop."""

import pytest
import torch
import torch.nn.functional as F

import vrpo.objectives.alignment as alignment_module
from test_encoders import _random_vit, _tiny_config
from test_models import randomize
from test_objective_contract import build, config
from vrpo.data import step_generator
from vrpo.encoders import DINOv2Encoder
from vrpo.errors import ConfigError
from vrpo.models import build_model
from vrpo.objectives import build_objective

HASTE = ("objective.attention_weight=0.5", "objective.attention_blocks=[1, 2]",
         "objective.encoder_attention_blocks=[1, 2]", "objective.attention_heads=2")  # fmt: skip


def tiny_dinov2():
    cfg = _tiny_config(registers=1, swiglu=False)  # 2 blocks, 2 heads, one register token
    return DINOv2Encoder(config=cfg, weights=_random_vit(cfg).state_dict(), input_size=56)  # a 4 x 4 grid


def test_attention_logits_are_the_ones_the_attention_uses():
    encoder = tiny_dinov2()
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    maps = encoder.attention_maps(images, [2])
    assert maps[2].shape == (2, 2, 16, 16)  # CLS and the register left out
    vit, x = encoder.vit, encoder.preprocess(images)
    seen = {}

    def keep(module, inputs, output):
        seen["in"] = inputs[0]

    vit.blocks[1].attn.register_forward_hook(keep)
    vit.forward_features(x)
    attn = vit.blocks[1].attn
    b, n, d = seen["in"].shape
    v = attn.qkv(seen["in"]).view(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)[2]
    mixed = attn.logits(seen["in"]).softmax(-1) @ v
    torch.testing.assert_close(attn.proj(mixed.transpose(1, 2).reshape(b, n, d)), attn(seen["in"]))
    model = randomize(build_model("SiT-T/8", 32, 1, 10, qk_norm=True))
    tokens = torch.randn(2, 16, model.hidden_size)
    a = model.blocks[0].attn
    q, k, v = a.qkv(tokens).view(2, 16, 3, 3, 64).permute(2, 0, 3, 1, 4)
    expected = F.scaled_dot_product_attention(a.q_norm(q), a.k_norm(k), v)
    torch.testing.assert_close(a.logits(tokens).softmax(-1) @ v, expected, atol=1e-5, rtol=1e-5)


def test_the_term_is_the_cross_entropy_and_stops_with_the_alignment(monkeypatch):
    monkeypatch.setattr(alignment_module, "build_alignment_encoders", lambda options, resolution: [tiny_dinov2()])
    _, model, _, batch = build("sit", "flow")
    haste = build_objective(config("repa", "flow", *HASTE), model)
    out = haste.loss(model, batch, step_generator(0, 0))
    step = haste.denoise(model, batch, step_generator(0, 0))
    targets = haste.alignment.encoders[0].attention_maps(batch.images, [1, 2])
    expected = (
        sum(
            -(targets[j].softmax(-1) * step.output.attention[i][:, :2].log_softmax(-1)).sum(-1).mean()
            for i, j in ((1, 1), (2, 2))
        )
        / 2
    )
    assert float(out.logs["loss_attention"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    model.zero_grad(set_to_none=True)
    (0.5 * expected).backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0 and model.blocks[4].attn.qkv.weight.grad is None
    assert haste.options.alignment_coefficients({"step": 1})["attention"] == 0.5
    stopped = build_objective(config("repa", "flow", *HASTE, "objective.schedule=stop", "objective.schedule_end=1"),
                              model)  # fmt: skip
    sit = build_objective(config("sit", "flow"), model)
    stopped.start_of_step(1)
    assert torch.equal(
        stopped.loss(model, batch, step_generator(0, 1)).loss, sit.loss(model, batch, step_generator(0, 1)).loss
    )


def test_encoders_without_attention_or_another_grid_are_refused(monkeypatch):
    _, model, _, _ = build("sit", "flow")
    with pytest.raises(ConfigError, match="efficientnet-lite0 exposes no attention maps"):
        build_objective(config("repa", "flow", *HASTE), model)
    wide = build_model("SiT-T/4", 32, 1, 10)  # an 8 x 8 grid against the encoder's 4 x 4
    monkeypatch.setattr(alignment_module, "build_alignment_encoders", lambda options, resolution: [tiny_dinov2()])
    with pytest.raises(ConfigError, match="token grid must equal"):
        build_objective(config("repa", "flow", *HASTE, "model.arch=SiT-T/4"), wide)
    with pytest.raises(ConfigError, match="attention_heads in 1..3"):
        config("repa", "flow", *HASTE[:3], "objective.attention_heads=4")
