"""Encoders through transformers (``hf:<dir>``), on tiny checkpoints that the tests write."""

import builtins

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vrpo.encoders import DINOv2Encoder, build_encoder, global_width  # noqa: E402

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def write(tmp_path, name, config, model_cls):
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # away from the zero-initialised defaults, so that every part matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def images(n=2, side=32, seed=0):
    return torch.randint(0, 256, (n, 1, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("registers", [0, 2])
def test_dinov2_through_transformers_equals_the_hand_written_vit(tmp_path, registers):
    if registers:
        config = transformers.Dinov2WithRegistersConfig(
            patch_size=14, image_size=224, num_register_tokens=2, **TINY_VIT
        )
        path = write(tmp_path, "dino", config, transformers.Dinov2WithRegistersModel)
    else:
        config = transformers.Dinov2Config(patch_size=14, image_size=224, **TINY_VIT)
        path = write(tmp_path, "dino", config, transformers.Dinov2Model)
    encoder = build_encoder(f"hf:{path}", resolution=256)
    assert encoder.input_size == 224 and encoder.grid_for((32, 32)) == (16, 16)  # REPA's 224-per-256 rule
    assert global_width(f"hf:{path}") == 32
    x = images()
    out = encoder(x)
    assert out.tokens.shape == (2, 256, 32) and out.global_.shape == (2, 32)
    direct = encoder.net(pixel_values=encoder.preprocess(x)).last_hidden_state
    torch.testing.assert_close(out.tokens, direct[:, 1 + registers :])  # CLS and registers dropped
    torch.testing.assert_close(out.global_, direct[:, 0])
    # the project's own ViT reading the same directory gives the same targets
    own = DINOv2Encoder(weights=path, resolution=256)(x)
    torch.testing.assert_close(out.tokens, own.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.global_, own.global_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("registers", [0, 4])
def test_a_torch_hub_checkpoint_converted_once_equals_the_hub_vit(tmp_path, registers, capsys):
    """`vrpo convert-dinov2` on a hub-named .pth: hf:<dir> then gives the hub ViT's tokens and CLS to
    1e-5 where no position interpolation is needed (transformers interpolates position embeddings
    otherwise than torch.hub: see docs/encoders.md)."""
    from vrpo.cli import main
    from vrpo.encoders.dinov2 import DINOv2Config, DinoVisionTransformer

    hub_interpolation = {"interpolate_offset": 0.0, "interpolate_antialias": True} if registers else {}
    config = DINOv2Config(embed_dim=128, depth=2, num_heads=2, img_size=224, num_register_tokens=registers,
                          **hub_interpolation)  # fmt: skip
    torch.manual_seed(0)
    vit = DinoVisionTransformer(config)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 128 else 0.0))
    torch.save(vit.state_dict(), tmp_path / "hub.pth")
    assert main(["convert-dinov2", str(tmp_path / "hub.pth"), "--out", str(tmp_path / "hf")]) == 0
    assert "hf:" in capsys.readouterr().out
    x = images(n=3, seed=1)
    converted = build_encoder(f"hf:{tmp_path / 'hf'}", resolution=256)(x)
    hub = DINOv2Encoder(weights=str(tmp_path / "hub.pth"), config=config, resolution=256)(x)
    assert converted.tokens.shape == (3, 256, 128)
    torch.testing.assert_close(converted.tokens, hub.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(converted.global_, hub.global_, rtol=1e-4, atol=1e-5)
    # a file that is not a DINOv2 hub checkpoint is named in one line
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert main(["convert-dinov2", str(tmp_path / "other.pth"), "--out", str(tmp_path / "x")]) == 1
    assert "not a DINOv2 hub" in capsys.readouterr().err


def test_clip_siglip_and_mae_towers(tmp_path):
    vit = dict(image_size=32, patch_size=8, **TINY_VIT)
    clip = write(tmp_path, "clip", transformers.CLIPVisionConfig(**vit), transformers.CLIPVisionModel)
    siglip = write(tmp_path, "siglip", transformers.SiglipVisionConfig(**vit), transformers.SiglipVisionModel)
    mae = write(tmp_path, "mae", transformers.ViTMAEConfig(**vit), transformers.ViTMAEModel)
    x = images()
    clip_encoder = build_encoder(f"hf:{clip}")
    out = clip_encoder(x)
    assert out.tokens.shape == (2, 16, 32)  # CLS dropped
    torch.testing.assert_close(out.global_, clip_encoder.net(pixel_values=clip_encoder.preprocess(x)).pooler_output)
    assert clip_encoder.preprocessing["normalize"]["mean"][0] == pytest.approx(0.48145466)
    siglip_encoder = build_encoder(f"hf:{siglip}")
    assert siglip_encoder(x).tokens.shape == (2, 16, 32)  # no CLS to drop
    assert siglip_encoder.preprocessing["normalize"]["std"] == [0.5] * 3
    mae_encoder = build_encoder(f"hf:{mae}")
    first, again = mae_encoder(x), mae_encoder(x)
    assert first.tokens.shape == (2, 16, 32)  # masking off: every patch
    torch.testing.assert_close(first.tokens, again.tokens, rtol=0, atol=0)  # no random shuffle
    with pytest.raises(ValueError, match="takes 32-px inputs"):
        build_encoder(f"hf:{clip}", input_size=64)


def test_a_foreign_checkpoint_and_a_missing_library_are_one_line_errors(tmp_path, monkeypatch):
    gpt = write(tmp_path, "gpt", transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2), transformers.GPT2Model)
    with pytest.raises(ValueError, match="is a 'gpt2' checkpoint"):
        build_encoder(f"hf:{gpt}")
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"pip install -e \.\[imagenet\]"):
        build_encoder(f"hf:{gpt}")


def test_repa_trains_on_an_hf_encoder(tmp_path, tiny_overrides):
    from vrpo.config import load_config
    from vrpo.train import train

    path = write(
        tmp_path, "dino", transformers.Dinov2Config(patch_size=14, image_size=56, **TINY_VIT), transformers.Dinov2Model
    )
    sets = [f"objective.encoders=[hf:{path}]", "objective.encoder_input_size=56", "objective.feature_cache=null",
            "objective.projector_width=32", "train.max_steps=2", "train.ckpt_every=2"]  # fmt: skip
    result = train(load_config("configs/fmnist/repa-t2.yaml", [*tiny_overrides, *sets]), tmp_path / "run")
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_loss))
