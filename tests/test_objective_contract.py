"""The objective contract (vrpo.objectives.base), checked for every registered method on every
model family it trains: a new method gets these tests by being registered.

Each case builds on a tiny model, gives a finite loss and gradients, is deterministic for a
given generator, round-trips its state through a checkpoint, and resumes bit-identically.
"""

import dataclasses

import pytest
import torch

from vrpo.config import load_config
from vrpo.data import load_split, step_generator
from vrpo.models import build_model
from vrpo.objectives import Batch, available_objectives, build_objective, objective_options
from vrpo.runs.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from vrpo.train import train
from vrpo.train.ema import make_ema
from vrpo.utils.images import to_model_space

pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 weights for the alignment methods")

FAMILIES = {
    "flow": ["model.arch=SiT-T/8", "sampler.method=heun"],
    "ddpm": ["model.arch=DiT-T/8", "sampler.method=ddpm"],
}
# Small values for whichever of these options a method has (a new method needs no entry here).
TINY_OPTIONS = {
    "encoder_input_size": 64,
    "projector_width": 64,
    "feature_cache": None,
    "warmup_steps": 2,
    "grad_share_every": 2,
}
CASES = [(name, family) for name in available_objectives() for family in objective_options(name).families]


def config(name: str, family: str, *extra):
    fields = {f.name for f in dataclasses.fields(objective_options(name))}
    tiny = {k: v for k, v in TINY_OPTIONS.items() if k in fields}
    objective = (
        "{" + ", ".join([f"name: {name}", *(f"{k}: {'null' if v is None else v}" for k, v in tiny.items())]) + "}"
    )
    return load_config(
        None,
        [
            "data.name=digits",
            "data.limit=40",
            "train.batch_size=8",
            "train.threads=1",
            "train.progress=false",
            "train.tensorboard=false",
            "train.sample_grid=4",
            "sampler.steps=2",
            "optim.lr=1e-3",
            "train.log_every=1",
            f"objective={objective}",
            *FAMILIES[family],
            *extra,
        ],
    )


def build(name: str, family: str):
    cfg = config(name, family)
    data = load_split("digits", "train")
    data.images, data.labels = data.images[:40], data.labels[:40]
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, 32, 1, 10, **cfg.model.build_options())
    with torch.no_grad():  # leave the adaLN-Zero init so that every block matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.manual_seed(1)
    objective = build_objective(cfg, model, data)
    objective.bind_ema(make_ema(model))  # as the loop does (SRA's teacher)
    index = torch.arange(8)
    batch = Batch(to_model_space(data.images[index]), data.labels[index], data.images[index], index)
    return cfg, model, objective, batch


def loss_and_grads(model, objective, batch, generator):
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    out = objective.loss(model, batch, generator)
    out.loss.backward()
    params = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return out, {n: None if p.grad is None else p.grad.clone() for n, p in params}


@pytest.mark.parametrize("name,family", CASES)
def test_declares_what_callers_use(name, family):
    cfg, model, objective, _ = build(name, family)
    assert objective.family == objective.noising.family == family
    assert all(1 <= i <= model.depth for i in objective.hidden_layers())
    encoders = cfg.objective.build_encoders(cfg.data.resolution)
    assert [e.name for e in encoders] == [e.name for e in (objective.alignment.encoders if objective.alignment else [])]
    assert len(cfg.objective.encoder_names()) == len(encoders)
    if objective.alignment is None:
        assert encoders == [] and cfg.objective.cache_root() is None
    else:
        assert [e.name for e in encoders] == [e.name for e in objective.alignment.encoders]
        assert 1 <= objective.alignment.depth <= model.depth and len(objective.alignment.projectors) == len(encoders)
    assert cfg.objective.without_feature_cache().cache_root() is None
    assert isinstance(objective.warnings({}), dict) and objective.finalize("/nonexistent") == []


@pytest.mark.parametrize("name,family", CASES)
def test_finite_loss_and_gradients_deterministic_per_generator(name, family):
    cfg, model, objective, batch = build(name, family)
    first, grads = loss_and_grads(model, objective, batch, step_generator(3, 1))
    coefficients = cfg.objective.alignment_coefficients({k: float(v) for k, v in first.logs.items()})
    # what a comparison reports beside a gain: every method that aligns to an encoder has one
    assert bool(coefficients) or objective.alignment is None
    assert all(isinstance(v, float) and v >= 0.0 for v in coefficients.values())
    schedule = cfg.objective.alignment_schedule({k: float(v) for k, v in first.logs.items()})
    assert all(isinstance(v, float) for v in schedule.values()) and (not schedule or coefficients)
    again, grads_again = loss_and_grads(model, objective, batch, step_generator(3, 1))
    other, _ = loss_and_grads(model, objective, batch, step_generator(3, 2))
    assert torch.isfinite(first.loss) and all(torch.isfinite(torch.as_tensor(v)).all() for v in first.logs.values())
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if not n.startswith("objective."))
    assert all(grads[f"objective.{n}"] is not None for n, p in objective.named_parameters() if p.requires_grad)
    assert torch.equal(first.loss, again.loss) and not torch.equal(first.loss, other.loss)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads.values(), grads_again.values()))


@pytest.mark.parametrize("name,family", CASES)
def test_state_round_trips_through_a_checkpoint(name, family, tmp_path):
    _, model, objective, batch = build(name, family)
    for step in range(3):  # statistics that change with steps (VRPO's) are not at their initial values
        loss_and_grads(model, objective, batch, step_generator(0, step))
        objective.end_of_step(step, applied=True)
    optimizer = torch.optim.AdamW([*model.parameters(), *objective.parameters()])
    save_checkpoint(tmp_path, 3, model, model, objective, optimizer, {}, keep_last=1)
    _, _, restored, _ = build(name, family)
    restored.load_state_dict(read_checkpoint(latest_checkpoint(tmp_path).path).tensors["objective"])
    state, back = objective.state_dict(), restored.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    a = objective.loss(model, batch, step_generator(0, 3))
    b = restored.loss(model, batch, step_generator(0, 3))
    assert torch.equal(a.loss, b.loss)


@pytest.mark.slow
@pytest.mark.parametrize("name,family", CASES)
def test_resume_is_bit_identical(name, family, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(config(name, family, "train.max_steps=4", "train.ckpt_every=2"), straight)
    train(config(name, family, "train.max_steps=2", "train.ckpt_every=2"), stopped)
    train(config(name, family, "train.max_steps=4", "train.ckpt_every=2"), stopped)  # resumes at step 2
    a, b = latest_checkpoint(straight), latest_checkpoint(stopped)
    assert a.step == b.step == 4
    for part in ("model", "ema", "objective", "optimizer"):
        assert a.tensors[part].keys() == b.tensors[part].keys()
        assert all(torch.equal(a.tensors[part][k], b.tensors[part][k]) for k in a.tensors[part]), part
