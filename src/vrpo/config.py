"""Typed run configuration: YAML files under configs/, ``--set key=value`` overrides, strict validation.

Every option has a name and a default here; a YAML file only lists what it changes.
Loading rejects unknown keys (suggesting the closest valid one), wrong types and impossible
combinations with a one-line ``ConfigError``. Objective options live with each objective
(``vrpo.objectives``) and are validated against the class that ``objective.name`` selects.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vrpo.config_checks import check_network_inputs, validate
from vrpo.conventions import apply_conventions, field_names
from vrpo.errors import ConfigError
from vrpo.objectives import objective_options


@dataclass
class ModelConfig:
    arch: str = "SiT-T/2"  # FAMILY-SIZE/PATCH: SiT or DiT; T, S, B, L, XL; patch 1, 2, 4, 8
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    global_token_dim: int = 0  # REG: the width of the encoder's global token the network also denoises
    decoder_depth: int = 0  # DDT: the last blocks form a velocity decoder conditioned on the others' output
    representation_channels: int = 0  # ReDi: channels of encoder principal components generated with the image
    branch_blocks: list[int] = field(default_factory=list)  # DeepFlow: the blocks that end a branch (a head each)

    def build_options(self) -> dict:
        """The constructor options of ``build_model`` beside the architecture and the data's shape."""
        return dict(
            mlp_ratio=self.mlp_ratio,
            qk_norm=self.qk_norm,
            global_token_dim=self.global_token_dim,
            decoder_depth=self.decoder_depth,
            representation_channels=self.representation_channels,
            branch_blocks=list(self.branch_blocks),
        )


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # fashion-mnist, mnist, digits, image-folder, tensors
    root: str | None = None  # where the files are; None searches the usual places
    split: str = "train"
    resolution: int = 32
    limit: int = 0  # > 0: a class-balanced subset of this many images (fixed by data_seed)
    data_seed: int = 0
    unconditional: bool = False


@dataclass
class TransportConfig:
    interpolant: str = "linear"  # linear (SiT Linear), cosine (SiT GVP)
    prediction: str = "velocity"  # velocity, noise, score
    timesteps: str = "uniform"  # uniform, logit_normal
    t_min: float = 0.0
    t_max: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_scale: float = 1000.0  # network time input = t * time_scale
    # noise_at_1 (here, REPA); data_at_1: the network was trained with t = 1 at the data and a velocity
    # data - noise (willisma/SiT): it is fed 1 - t and its velocity is negated, at the network's boundary
    time_direction: str = "noise_at_1"


@dataclass
class DiffusionConfig:
    """DiT's DDPM (objective ``ddpm``)."""

    num_steps: int = 1000
    schedule: str = "linear"


@dataclass
class SamplerConfig:
    method: str = "heun"  # euler, heun, sde (flow models); ddpm (DiT)
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    t_start: float = 1.0
    t_end: float = 0.0
    diffusion_scale: float = 1.0  # SDE: w(t) = diffusion_scale * sigma(t)
    heun_last_corrector: bool = True  # false: the last Heun step is an Euler step (official REPA/SiT)
    guidance_at: str = "evaluation"  # guidance interval tested at each evaluation's time, or at the step's start
    encoder_sharing: int = 1  # DDT: the condition encoder runs every k-th network evaluation, reused between
    encoder_schedule: str = "uniform"  # or optimal: as many recompute points, placed by DDT's dynamic programme
    representation_guidance: float = 1.0  # ReDi: guide away from the pass without its representation channels
    global_cfg_scale: float | None = None  # REG's global token: its guidance scale; None: cfg_scale (official: 1.5)
    sde_last_from: float | None = None  # SDE: grid linspace(t_start, it, steps) then t_end (REPA: 0.04); None: uniform
    # sample: each sample's noise keyed on (seed, its index), the same for any batch size and world size;
    # batch: keyed on the batch's first index (runs evaluated before per-sample keying read as batch)
    noise_keying: str = "sample"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # constant, cosine, linear (decay after warm-up)
    min_lr_ratio: float = 0.0
    # AdamW's fused kernel (one pass over all parameters); false: torch's default path. The same update to
    # float rounding; benchmarks/step_roofline.py measures the difference. Runs saved without it read false.
    fused: bool = True


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 64  # global batch, over all ranks and accumulation steps
    grad_accum: int = 1
    label_dropout: float = 0.1
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step))
    ema_heads: bool = False  # the EMA covers the objective's heads (projectors) too, as REPA's
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    sample_grid: int = 64
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    max_nonfinite: int = 5  # consecutive skipped steps before the run stops
    dist_timeout_s: float = 600.0  # torchrun: a collective waiting longer on a dead or hung rank fails
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    activation_checkpointing: bool = False  # blocks recompute their activations in backward (less memory)
    compile: bool = False  # torch.compile each transformer block of the trained network
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: no code generation)
    parallel: str = "ddp"  # ddp, or fsdp: FSDP2 shards the network and its EMA (checkpoints sharded)
    fsdp_precision: str = "fp32"  # fsdp: fp32, or bf16 parameters in forward and backward (fp32 reductions)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class EvalConfig:
    """Evaluation during training (after the checkpoint of the step: sampled on every rank, scored on rank 0)."""

    every: int = 0  # steps between evaluations; 0: off. The final step is evaluated when > 0
    num_samples: int = 5000  # generated images per FID
    ref: str = ""  # reference: NAME:SPLIT, npz, folder or stats file; "" = the training set's test split
    ref_num: int = 10000  # reference images (class-balanced subset when larger)
    metrics: list[str] = field(default_factory=lambda: ["fid"])  # fid, sfid, pr, fd_encoder
    # The last step may use a costlier evaluation (curves on a cheap metric, FID at the end).
    final_num_samples: int = 0  # 0: num_samples
    final_metrics: list[str] = field(default_factory=list)  # empty: metrics
    ra_num: int = 500  # held-out images for RA at t = 0.5 (alignment methods); 0: off
    held_out: str = ""  # latent runs: a second prepared latent folder for RA (""; the run's own folder)
    cache_dir: str = "~/.cache/vrpo/refstats"
    seed: int = 0
    # samples per sampling batch (and per rank): with per-sample noise it sets the speed, not the samples
    batch_size: int = 64


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "transport": TransportConfig,
    "diffusion": DiffusionConfig,
    "sampler": SamplerConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: Any = None  # the selected objective's Options dataclass
    conventions: str = "vrpo"  # vrpo or official (REPA/SiT's): a set of defaults, vrpo.conventions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation


def _closest(key: str, options, prefix: str = "") -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads '1e-4' (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def build_section(cls: type, values: dict | None, prefix: str):
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}.{key}'{_closest(key, names, prefix + '.')}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. train.max_steps=40)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def config_from_dict(tree: dict) -> Config:
    tree = dict(tree or {})
    valid = [*SECTIONS, "objective", "conventions"]
    for key in tree:
        if key not in valid:
            raise ConfigError(f"unknown config section '{key}'{_closest(key, valid)}")
    objective = tree.get("objective") or {"name": "sit"}
    if not isinstance(objective, dict):
        raise ConfigError(f"config section 'objective' must be a mapping, got {objective!r}")
    options_cls = objective_options(objective.get("name", "sit"))
    tree = apply_conventions({**tree, "objective": objective}, field_names(options_cls))
    sections = {name: build_section(cls, tree.get(name), name) for name, cls in SECTIONS.items()}
    objective = dict(tree["objective"])
    name = objective.pop("name", "sit")
    cfg = Config(
        **sections,
        objective=build_section(options_cls, {**objective, "name": name}, "objective"),
        conventions=tree.get("conventions", "vrpo"),
    )
    needs = cfg.objective.model_defaults(cfg.model.arch)
    for key, value in needs.items():  # the network variant a method needs
        if getattr(cfg.model, key) == getattr(ModelConfig(), key):
            setattr(cfg.model, key, value)
    check_network_inputs(cfg, needs)
    validate(cfg)
    return cfg


def with_sampler(cfg: Config, **overrides) -> Config:
    """``cfg`` with these sampler fields (None keeps one), checked as a loaded config is."""
    fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"unknown sampler option '{key}'{_closest(key, sorted(fields))}")
    sampler = dataclasses.replace(cfg.sampler, **{k: v for k, v in overrides.items() if v is not None})
    updated = dataclasses.replace(cfg, sampler=sampler)
    validate(updated)
    return updated


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``: mappings merge key by key, every other value is replaced."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def read_yaml_tree(path: str | Path, kind: str = "config", merge=deep_merge, chain: tuple = ()) -> dict:
    """A YAML file's mapping; ``extends: OTHER.yaml`` (relative to the working directory or to
    this file) inherits another file's keys through ``merge``, so that a variant states only
    what it changes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file {path} not found" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{kind} files extend each other in a loop: {' -> '.join(map(str, chain))} -> {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind} file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{kind} file {path} must hold a mapping of keys")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    parent_path = Path(parent) if Path(parent).is_file() else path.parent / parent
    return merge(read_yaml_tree(parent_path, kind, merge, (*chain, path.resolve())), tree)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    tree = read_yaml_tree(path) if path is not None else {}
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return config_from_dict(tree)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
