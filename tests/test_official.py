"""The official REPA/SiT conventions (``conventions: official``) and `vrpo import-checkpoint`.

A small SiT in the official code's parameter layout (github sihyun-yu/REPA, models/sit.py) with
seeded weights is written as that code writes its checkpoints, imported, and this project's
forward, REPA loss, Euler, Heun and SDE samplers are compared with a direct re-implementation of
the official formulas, written here from the published code's equations.
"""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vrpo.config import load_config
from vrpo.runs import CheckpointError, load_run_config, load_run_model
from vrpo.runs.checkpoint import latest_checkpoint
from vrpo.runs.importing import import_checkpoint
from vrpo.transport import build_noising, generate

WIDTH, DEPTH, HEADS, PATCH, CHANNELS, CLASSES, SIZE = 192, 6, 3, 4, 4, 10, 16  # SiT-T/4 on 16 x 16 latents
ENCODER_DEPTH, PROJECTOR_WIDTH, TARGET_DIM = 2, 64, 32
REPA = [  # latents: targets from a feature cache (only named here)
    f"objective={{name: repa, encoder_depth: {ENCODER_DEPTH}, projector_width: {PROJECTOR_WIDTH}, "
    "feature_cache: features}"
]


# ---------------------------------------------------------------- the official formulas


def official_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table: the first half of the channels encodes the column, sin before cos."""

    def one_axis(d, positions):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    columns, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([one_axis(dim // 2, columns), one_axis(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()[None]


def official_state(seed: int, out_channels: int = CHANNELS, projectors: bool = True) -> dict[str, torch.Tensor]:
    """SiT's layout (DiT's with out_channels 2C, its learned variance, and no projectors)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return 0.05 * torch.randn(*shape, generator=g)

    state = {
        "pos_embed": official_pos_embed(WIDTH, SIZE // PATCH),
        "x_embedder.proj.weight": w(WIDTH, CHANNELS, PATCH, PATCH),
        "x_embedder.proj.bias": w(WIDTH),
        "t_embedder.mlp.0.weight": w(WIDTH, 256),
        "t_embedder.mlp.0.bias": w(WIDTH),
        "t_embedder.mlp.2.weight": w(WIDTH, WIDTH),
        "t_embedder.mlp.2.bias": w(WIDTH),
        "y_embedder.embedding_table.weight": w(CLASSES + 1, WIDTH),
        "final_layer.linear.weight": w(PATCH * PATCH * out_channels, WIDTH),
        "final_layer.linear.bias": w(PATCH * PATCH * out_channels),
        "final_layer.adaLN_modulation.1.weight": w(2 * WIDTH, WIDTH),
        "final_layer.adaLN_modulation.1.bias": w(2 * WIDTH),
    }
    for i in range(DEPTH):
        for name, shape in {
            "attn.qkv": (3 * WIDTH, WIDTH), "attn.proj": (WIDTH, WIDTH), "mlp.fc1": (4 * WIDTH, WIDTH),
            "mlp.fc2": (WIDTH, 4 * WIDTH), "adaLN_modulation.1": (6 * WIDTH, WIDTH),
        }.items():  # fmt: skip
            state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = w(*shape), w(shape[0])
    for index, shape in (
        {}
        if not projectors
        else {
            0: (PROJECTOR_WIDTH, WIDTH),
            2: (PROJECTOR_WIDTH, PROJECTOR_WIDTH),
            4: (TARGET_DIM, PROJECTOR_WIDTH),
        }.items()
    ):
        state[f"projectors.0.{index}.weight"], state[f"projectors.0.{index}.bias"] = w(*shape), w(shape[0])
    return state


def linear(S, name, x):
    return F.linear(x, S[f"{name}.weight"], S[f"{name}.bias"])


def official_forward(S, x, t, y):
    """(velocity, [projected block-ENCODER_DEPTH tokens]) as the official SiT computes them; t in [0, 1]."""
    n, grid = x.shape[0], SIZE // PATCH
    h = F.conv2d(x, S["x_embedder.proj.weight"], S["x_embedder.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    h = h + S["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    angles = t[:, None].float() * freqs[None]
    t_emb = linear(
        S, "t_embedder.mlp.2", F.silu(linear(S, "t_embedder.mlp.0", torch.cat([angles.cos(), angles.sin()], -1)))
    )
    c = t_emb + S["y_embedder.embedding_table.weight"][y]

    def norm(v):
        return F.layer_norm(v, (WIDTH,), eps=1e-6)

    def modulate(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    zs = []
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = linear(S, p + "adaLN_modulation.1", F.silu(c)).chunk(6, -1)
        a = modulate(norm(h), sh1, sc1)
        q, k, v = linear(S, p + "attn.qkv", a).reshape(n, -1, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (WIDTH // HEADS) ** -0.5, dim=-1)
        h = h + g1[:, None] * linear(S, p + "attn.proj", (weights @ v).transpose(1, 2).reshape(n, -1, WIDTH))
        m = linear(S, p + "mlp.fc1", modulate(norm(h), sh2, sc2))
        h = h + g2[:, None] * linear(S, p + "mlp.fc2", F.gelu(m, approximate="tanh"))
        if i + 1 == ENCODER_DEPTH and "projectors.0.0.weight" in S:
            zs.append(
                linear(S, "projectors.0.4", F.silu(linear(S, "projectors.0.2", F.silu(linear(S, "projectors.0.0", h)))))
            )
    shift, scale = linear(S, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, -1)
    out = linear(S, "final_layer.linear", modulate(norm(h), shift, scale))
    out = out.reshape(n, grid, grid, PATCH, PATCH, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, -1, SIZE, SIZE), zs


def guided(S, x, t, y, scale, use):
    """The official CFG batch: conditional half first, the null label (CLASSES) second."""
    if not use:
        return official_forward(S, x.float(), t.float(), y)[0].double()
    both = official_forward(
        S, torch.cat([x, x]).float(), torch.cat([t, t]).float(), torch.cat([y, torch.full_like(y, CLASSES)])
    )[0]
    cond, uncond = both.double().chunk(2)
    return uncond + scale * (cond - uncond)


def official_ode(S, noise, y, steps, heun, scale, high):
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = noise.double()
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        use = scale > 1 and t_cur <= high  # decided at t_cur, for the corrector too
        d = guided(S, x, torch.full((x.shape[0],), float(t_cur)), y, scale, use)
        x_next = x + (t_next - t_cur) * d
        if heun and i < steps - 1:
            d2 = guided(S, x_next, torch.full((x.shape[0],), float(t_next)), y, scale, use)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def official_sde(S, noise, y, steps, scale, high, generator):
    t_steps = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = noise.double()

    def drift(x, t_cur):
        v = guided(S, x, torch.full((x.shape[0],), float(t_cur)), y, scale, scale > 1 and t_cur <= high)
        score = ((t_cur - 1) * v - x) / t_cur  # the linear path's score from the velocity (alpha / alpha' = t - 1)
        return v - 0.5 * (2 * t_cur) * score  # diffusion 2t

    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        x = x + drift(x, t_cur) * (t_next - t_cur) + torch.sqrt(2 * t_cur) * eps * torch.sqrt(torch.abs(t_next - t_cur))
    return x + (t_steps[-1] - t_steps[-2]) * drift(x, t_steps[-2])  # the last step is deterministic


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(official model state, official EMA state, imported run folder)."""
    root = tmp_path_factory.mktemp("official")
    model_state, ema_state = official_state(0), official_state(1)
    checkpoint = {"model": model_state, "ema": ema_state, "opt": {"state": {}, "param_groups": []},
                  "args": argparse.Namespace(model="SiT-T/4", proj_coeff=0.5), "steps": 7}  # fmt: skip
    torch.save(checkpoint, root / "0000007.pt")
    run = root / "run"
    import_checkpoint("repa", root / "0000007.pt", run, overrides=REPA)
    return model_state, ema_state, run


def inputs(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=g), torch.rand(n, generator=g), torch.arange(n) % CLASSES


def test_imported_forward_and_projection_equal_the_official(imported):
    _, ema_state, run = imported
    cfg, model, step = load_run_model(run, "ema")
    assert step == 7 and cfg.conventions == "official" and cfg.model.arch == "SiT-T/4"
    assert cfg.transport.time_scale == 1.0 and cfg.objective.projector_init == "xavier" and cfg.train.ema_heads
    x, t, y = inputs()
    want, zs = official_forward(ema_state, x, t, y)
    out = model(x, build_noising(cfg).model_time(t), y, hidden_layers=(ENCODER_DEPTH,))
    assert (out.prediction - want).abs().max() < 1e-5
    ckpt = latest_checkpoint(run)
    assert ckpt.meta["imported_from"]["source"] == "repa"
    heads = ckpt.tensors["ema_heads"]  # the official EMA covers the projectors: they come from 'ema'
    h = out.hidden[ENCODER_DEPTH]
    for i in (0, 2):
        h = F.silu(
            F.linear(h, heads[f"alignment.projectors.0.net.{i}.weight"], heads[f"alignment.projectors.0.net.{i}.bias"])
        )
    z = F.linear(h, heads["alignment.projectors.0.net.4.weight"], heads["alignment.projectors.0.net.4.bias"])
    assert (z - zs[0]).abs().max() < 1e-5
    assert torch.equal(
        ckpt.tensors["objective"]["alignment.projectors.0.net.0.weight"], imported[0]["projectors.0.0.weight"]
    )


def test_repa_loss_equals_the_official(imported):
    from vrpo.objectives.alignment import AlignmentTargets

    cfg = load_run_config(imported[2])
    g = torch.Generator().manual_seed(3)
    x, noise, t = (
        torch.randn(4, CHANNELS, SIZE, SIZE, generator=g),
        torch.randn(4, CHANNELS, SIZE, SIZE, generator=g),
        torch.rand(4, generator=g),
    )
    noising = build_noising(cfg)
    x_t = noising.add_noise(x, noise, t)
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - tb) * x + tb * noise, atol=1e-6)
    prediction = torch.randn(4, CHANNELS, SIZE, SIZE, generator=g)
    per_sample, _ = noising.loss_terms(prediction, x, noise, x_t, t)
    assert torch.allclose(per_sample, ((prediction - (noise - x)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    zs_tilde = [torch.randn(4, 16, TARGET_DIM, generator=g) for _ in range(2)]  # two encoders
    zs = [torch.randn(4, 16, TARGET_DIM, generator=g) for _ in range(2)]
    official = sum(
        -(F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean(-1).sum() for a, b in zip(zs, zs_tilde)
    ) / (2 * 4)
    ours = -AlignmentTargets.cosine(zs_tilde, zs).mean()
    assert abs(float(ours - official)) < 1e-6


@pytest.mark.parametrize("method,scale", [("euler", 1.0), ("heun", 1.0), ("heun", 1.8), ("sde", 1.0), ("sde", 1.8)])
def test_samplers_equal_the_official(imported, method, scale):
    _, ema_state, run = imported
    cfg, model, _ = load_run_model(run, "ema")
    noise, _, y = inputs(5)
    steps, high = 6, 0.7
    ours = generate(model, cfg, y, noise, torch.Generator().manual_seed(9), method=method, steps=steps,
                    cfg_scale=scale, cfg_interval=[0.0, high])  # fmt: skip
    if method == "sde":
        want = official_sde(ema_state, noise, y, steps, scale, high, torch.Generator().manual_seed(9))
    else:
        want = official_ode(ema_state, noise, y, steps, method == "heun", scale, high)
    assert (ours.double() - want).abs().max() < 1e-5


def test_a_checkpoint_that_pickles_anything_else_is_refused_in_one_line(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": official_state(0), "args": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle print:") as err:
        import_checkpoint("repa", tmp_path / "bad.pt", tmp_path / "run")
    assert "\n" not in str(err.value) and "this must never run" not in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "bad.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        import_checkpoint("repa", tmp_path / "cut.pt", tmp_path / "run")


def test_import_is_strict_and_says_what_does_not_fit(tmp_path):
    state = official_state(0)
    del state["blocks.3.mlp.fc2.bias"]
    torch.save(state, tmp_path / "last.pt")  # a bare state dict, as REPA's released last.pt
    with pytest.raises(CheckpointError, match=r"missing \['blocks.3.mlp.fc2.bias'\]"):
        import_checkpoint("repa", tmp_path / "last.pt", tmp_path / "run")
    torch.save(official_state(0), tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="--from repa"):
        import_checkpoint("sit", tmp_path / "last.pt", tmp_path / "run")
    run = tmp_path / "run"
    import_checkpoint("repa", tmp_path / "last.pt", run)  # no alignment objective: sampling only
    with pytest.raises(CheckpointError, match="already holds a run"):
        import_checkpoint("repa", tmp_path / "last.pt", run)


def test_conventions_fill_unset_keys_and_explicit_ones_win():
    official = load_config(None, ["conventions=official", "sampler.diffusion_scale=1.5"])
    assert official.transport.time_scale == 1.0 and not official.sampler.heun_last_corrector
    assert official.sampler.sde_last_from == 0.04 and official.sampler.diffusion_scale == 1.5
    assert official.sampler.guidance_at == "step" and official.train.ema_heads and not official.train.ema_warmup
    ours = load_config(None, [])
    assert ours.transport.time_scale == 1000.0 and ours.sampler.heun_last_corrector and not ours.train.ema_heads
    from vrpo.config import ConfigError

    with pytest.raises(ConfigError, match="conventions must be one of vrpo, official"):
        load_config(None, ["conventions=offical"])


def test_the_ema_covers_the_projectors_and_resumes_under_official_conventions(tmp_path, tiny_overrides):
    from safetensors.torch import load_file

    from vrpo.runs.checkpoint import step_dirs
    from vrpo.train import train

    pytest.importorskip("efficientnet_lite_pytorch")
    settings = [*tiny_overrides, "conventions=official", "train.ema_decay=0.5", "train.ckpt_every=1",
                "train.keep_last=5", "objective.projector_width=64", "objective.encoder_input_size=64",
                "objective.feature_cache=null"]  # fmt: skip
    train(load_config("configs/fmnist/repa-t2.yaml", [*settings, "train.max_steps=2"]), tmp_path / "run")
    first, second = (load_file(str(d / "ema_heads.safetensors")) for d in reversed(step_dirs(tmp_path / "run")))
    heads = load_file(str(step_dirs(tmp_path / "run")[0] / "objective.safetensors"))
    assert first.keys() == {k for k in heads if "projectors" in k} and len(first) == 6
    for key, value in second.items():  # no warm-up: ema_2 = 0.5 ema_1 + 0.5 heads_2
        assert torch.allclose(value, 0.5 * first[key] + 0.5 * heads[key], atol=1e-7)
    straight = tmp_path / "straight"
    train(load_config("configs/fmnist/repa-t2.yaml", [*settings, "train.max_steps=3"]), straight)
    train(load_config("configs/fmnist/repa-t2.yaml", [*settings, "train.max_steps=3"]), tmp_path / "run")  # resumes
    a, b = (load_file(str(step_dirs(r)[0] / "ema_heads.safetensors")) for r in (straight, tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_dit_checkpoint_imports_with_its_integer_times(tmp_path):
    state = official_state(2, out_channels=2 * CHANNELS, projectors=False)
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(), "steps": 3}, tmp_path / "dit.pt")
    import_checkpoint("dit", tmp_path / "dit.pt", tmp_path / "run")
    cfg, model, _ = load_run_model(tmp_path / "run", "ema")
    assert cfg.model.arch == "DiT-T/4" and cfg.conventions == "vrpo" and model.learn_sigma
    x, _, y = inputs(4)
    t = torch.tensor([0, 250, 500, 999])  # DiT's network sees the diffusion step index
    assert (model(x, t, y).prediction - official_forward(state, x, t, y)[0]).abs().max() < 1e-5


def test_a_willisma_sit_checkpoint_imports_with_its_reversed_time_and_without_sigma(tmp_path):
    """SiT's own code: t = 1 is the data, the velocity is data - noise, and half the outputs are sigma."""
    state = official_state(3, out_channels=2 * CHANNELS, projectors=False)
    torch.save({"model": state, "ema": state, "args": argparse.Namespace(), "steps": 2}, tmp_path / "sit.pt")
    import_checkpoint("sit", tmp_path / "sit.pt", tmp_path / "run")
    cfg, model, _ = load_run_model(tmp_path / "run", "ema")
    assert cfg.transport.time_direction == "data_at_1" and not model.learn_sigma
    x, t, y = inputs(6)
    noising = build_noising(cfg)
    ours = noising.from_network(model(x, noising.model_time(t), y).prediction)  # noise at t = 1, v = noise - x
    theirs = official_forward(state, x, 1 - t, y)[0][:, :CHANNELS]  # their time and their velocity
    assert (ours + theirs).abs().max() < 1e-5
    sampled = generate(model, cfg, y, inputs(7)[0], torch.Generator().manual_seed(0), method="euler", steps=4)
    grid = torch.linspace(1, 0, 5, dtype=torch.float64)  # the same ODE in their time: dx/ds = v_theirs(x, s)
    x_theirs = inputs(7)[0].double()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        v = -official_forward(state, x_theirs.float(), torch.full((4,), 1 - float(t_cur)), y)[0][:, :CHANNELS]
        x_theirs = x_theirs + (t_next - t_cur) * v.double()
    assert (sampled.double() - x_theirs).abs().max() < 1e-5
