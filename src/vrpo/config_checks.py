"""Cross-field checks of a loaded run configuration: combinations that cannot work are refused
before any compute, each with a one-line ``ConfigError``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vrpo.errors import ConfigError
from vrpo.models import SIZES, parse_arch
from vrpo.transport.noising import FAMILY_SAMPLERS, SAMPLERS, family_of
from vrpo.utils.randomness import NOISE_KEYINGS

if TYPE_CHECKING:
    from vrpo.config import Config

# Network inputs that only some objectives feed, with the objective that does.
NETWORK_INPUTS = {
    "global_token_dim": "reg (or vrpo with global_token)",
    "representation_channels": "redi",
    "branch_blocks": "deepflow",
}


def need(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_network_inputs(cfg: Config, fed: dict) -> None:
    """Refuse a network variant whose extra input the chosen objective would leave unfed."""
    for key, method in NETWORK_INPUTS.items():
        need(
            not getattr(cfg.model, key) or key in fed,
            f"model.{key} is {getattr(cfg.model, key)}, but objective {cfg.objective.name} does not feed it: "
            f"use objective {method}, or 0",
        )


def validate(cfg: Config) -> None:
    """Every cross-field check, then the objective's own."""
    for check in (check_model, check_training, check_transport, check_sampler, check_family):
        check(cfg)
    cfg.objective.validate(cfg)


def check_model(cfg: Config) -> None:
    """The network: architecture, patch against resolution, variants that exclude each other."""
    try:
        _, _, patch = parse_arch(cfg.model.arch)
    except ValueError as err:
        raise ConfigError(f"config key 'model.arch': {err}") from None
    need(
        cfg.data.resolution % patch == 0,
        f"data.resolution {cfg.data.resolution} is not divisible by the patch size {patch} of {cfg.model.arch}",
    )
    need(cfg.model.global_token_dim >= 0, f"model.global_token_dim must be >= 0, got {cfg.model.global_token_dim}")
    depth = SIZES[parse_arch(cfg.model.arch)[1]][1]
    need(
        0 <= cfg.model.decoder_depth < depth,
        f"model.decoder_depth must be in 0..{depth - 1} for the {depth} blocks of {cfg.model.arch}, got "
        f"{cfg.model.decoder_depth}",
    )
    need(
        not (cfg.model.decoder_depth and cfg.model.global_token_dim),
        "model.decoder_depth (DDT) with model.global_token_dim (REG) is not supported",
    )


def check_training(cfg: Config) -> None:
    """The loop, its evaluations and its optimiser."""
    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps must be >= 1")
    need(t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
    need(
        t.batch_size % t.grad_accum == 0,
        f"train.batch_size {t.batch_size} is not divisible by train.grad_accum {t.grad_accum}",
    )
    need(t.ckpt_every >= 1, "train.ckpt_every must be >= 1")
    need(t.dist_timeout_s > 0, f"train.dist_timeout_s must be > 0, got {t.dist_timeout_s}")
    need(t.keep_last >= 1, "train.keep_last must be >= 1")
    need(0.0 <= t.label_dropout < 1.0, "train.label_dropout must be in [0, 1)")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    need(t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    need(t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp or fsdp, got {t.parallel!r}")
    need(t.fsdp_precision in ("fp32", "bf16"), f"train.fsdp_precision must be fp32 or bf16, got {t.fsdp_precision!r}")
    e = cfg.eval
    need(
        e.every >= 0 and e.num_samples >= 2 and e.ra_num >= 0 and e.batch_size >= 1,
        "eval.every and eval.ra_num must be >= 0, eval.num_samples >= 2 and eval.batch_size >= 1",
    )
    need(
        e.final_num_samples == 0 or e.final_num_samples >= 2,
        "eval.final_num_samples must be 0 (= eval.num_samples) or >= 2",
    )
    need(
        not (e.every and cfg.data.name == "tensors"),
        "eval.every needs pixels: data.name=tensors has no decoder (data.name=latents decodes through its VAE)",
    )
    o = cfg.optim
    need(len(o.betas) == 2, "optim.betas needs two values")
    need(
        o.schedule in ("constant", "cosine", "linear"),
        f"optim.schedule must be constant, cosine or linear, got {o.schedule!r}",
    )


def check_transport(cfg: Config) -> None:
    """The interpolant, the prediction target and the timestep range."""
    tr = cfg.transport
    need(
        tr.interpolant in ("linear", "cosine"),
        f"transport.interpolant must be linear or cosine, got {tr.interpolant!r}",
    )
    need(
        tr.prediction in ("velocity", "noise", "score"),
        f"transport.prediction must be velocity, noise or score, got {tr.prediction!r}",
    )
    need(
        tr.timesteps in ("uniform", "logit_normal"),
        f"transport.timesteps must be uniform or logit_normal, got {tr.timesteps!r}",
    )
    need(0.0 <= tr.t_min < tr.t_max <= 1.0, "transport.t_min < transport.t_max must lie in [0, 1]")
    need(
        tr.time_direction in ("noise_at_1", "data_at_1"),
        f"transport.time_direction must be noise_at_1 or data_at_1, got {tr.time_direction!r}",
    )
    need(
        tr.time_direction == "noise_at_1" or tr.prediction == "velocity",
        "transport.time_direction=data_at_1 (SiT's own) needs transport.prediction=velocity",
    )


def check_sampler(cfg: Config) -> None:
    """The sampler and the guidances, against the network and the data."""
    tr = cfg.transport
    s = cfg.sampler
    need(
        s.method in SAMPLERS,
        f"sampler.method must be one of {', '.join(SAMPLERS)}, got {s.method!r}",
    )
    need(
        s.noise_keying in NOISE_KEYINGS,
        f"sampler.noise_keying must be one of {', '.join(NOISE_KEYINGS)}, got {s.noise_keying!r}",
    )
    need(
        s.guidance_at in ("evaluation", "step"),
        f"sampler.guidance_at must be evaluation or step, got {s.guidance_at!r}",
    )
    need(
        s.sde_last_from is None or s.method != "sde" or s.t_end < s.sde_last_from < s.t_start,
        f"sampler.sde_last_from must lie between sampler.t_end and sampler.t_start, got {s.sde_last_from}",
    )
    need(
        len(s.cfg_interval) == 2 and s.cfg_interval[0] <= s.cfg_interval[1],
        "sampler.cfg_interval must be [t_low, t_high] with t_low <= t_high",
    )
    need(
        s.encoder_sharing >= 1 and s.encoder_schedule in ("uniform", "optimal"),
        f"sampler.encoder_sharing must be >= 1 and sampler.encoder_schedule uniform or optimal, got "
        f"{s.encoder_sharing}, {s.encoder_schedule!r}",
    )
    need(
        s.encoder_sharing == 1 or (cfg.model.decoder_depth > 0 and family_of(cfg.model.arch) == "flow"),
        "sampler.encoder_sharing > 1 shares a DDT condition encoder: it needs model.decoder_depth > 0 (SiT-*)",
    )
    need(
        s.representation_guidance == 1.0 or (cfg.model.representation_channels > 0 and s.cfg_scale == 1.0),
        "sampler.representation_guidance != 1 needs model.representation_channels > 0 (ReDi) and "
        "sampler.cfg_scale 1 (the two guidances are not combined)",
    )
    need(
        not (cfg.data.unconditional and s.cfg_scale != 1.0),
        "sampler.cfg_scale != 1 needs labels, but data.unconditional is true",
    )
    if tr.prediction != "velocity":
        need(
            s.t_start < 1.0,
            f"transport.prediction={tr.prediction} is undefined at t=1: set sampler.t_start below 1 (e.g. 0.999)",
        )


def check_family(cfg: Config) -> None:
    """The objective and the sampler against the model's family (flow or ddpm)."""
    s = cfg.sampler
    family, options = family_of(cfg.model.arch), cfg.objective
    need(
        family in options.families,
        f"objective '{options.name}' does not train the {family} family of model.arch "
        f"{cfg.model.arch}: it trains {' and '.join(options.families)} (SiT-* models are flow, DiT-* models ddpm)",
    )
    if family == "ddpm":
        need(
            cfg.diffusion.schedule == "linear",
            f"diffusion.schedule {cfg.diffusion.schedule!r} is not available (linear)",
        )
    samplers = FAMILY_SAMPLERS[family]
    need(
        s.method in samplers,
        f"sampler.method={s.method} does not fit the {family} family of model.arch {cfg.model.arch}: "
        f"use {' or '.join(samplers)}",
    )
