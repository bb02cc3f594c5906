"""Conventions: one config key, ``conventions``, that selects a set of defaults at once.

``vrpo`` (the default) is this project's; ``official`` reproduces the official REPA / SiT code
(github sihyun-yu/REPA, willisma/SiT), so that its released weights and recipes give its numbers
here. Each convention stays its own option, and a key set explicitly keeps its value under
either set (as VRPO's ``spec``). ``docs/conventions.md`` lists them with both defaults.
"""

from __future__ import annotations

import dataclasses

from vrpo.errors import ConfigError

CONVENTIONS: dict[str, dict[str, object]] = {
    "vrpo": {},
    "official": {
        "transport.time_scale": 1.0,  # the network sees t in [0, 1] (here by default t x 1000)
        "objective.projector_init": "xavier",  # xavier-uniform weights, zero biases (here: PyTorch's default)
        "train.ema_heads": True,  # the EMA covers the projectors too (here: the network only)
        "train.ema_warmup": False,  # a plain decay from the first step (here: DiT's warm-up)
        "sampler.heun_last_corrector": False,  # the last Heun step is an Euler step
        "sampler.guidance_at": "step",  # guidance decided at the step's start for both Heun evaluations
        "sampler.sde_last_from": 0.04,  # SDE grid linspace(1, 0.04, N), then one deterministic step to 0
        "sampler.diffusion_scale": 2.0,  # SDE diffusion 2t (w = 2 sigma(t): the same on the linear path)
    },
}


def apply_conventions(tree: dict, objective_fields: set[str]) -> dict:
    """``tree`` with the defaults of its ``conventions`` filled in where it leaves a key unset
    (objective keys only where the selected objective has them: SiT has no projector)."""
    name = tree.get("conventions", "vrpo")
    if name not in CONVENTIONS:
        raise ConfigError(f"conventions must be one of {', '.join(CONVENTIONS)}, got {name!r}")
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in tree.items()}
    for dotted, value in CONVENTIONS[name].items():
        section, key = dotted.split(".")
        if section == "objective" and key not in objective_fields:
            continue
        node = out[section] = out.get(section) or {}
        if isinstance(node, dict):  # a malformed section is reported by the section's own check
            node.setdefault(key, value)
    return out


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
