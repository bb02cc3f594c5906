"""Training methods behind one contract (``vrpo.objectives.base``); a method is one module plus its config.

To add one: subclass ``Objective`` (or ``AlignmentObjective`` for a method that aligns to a
frozen encoder) in a new module, give it an ``Options`` dataclass, and list it in
``_MODULES`` below; the contract test (tests/test_objective_contract.py) then covers it.
"""

from __future__ import annotations

import difflib
import importlib

from vrpo.errors import ConfigError
from vrpo.objectives.base import Batch, DenoisingStep, LossOutput, Objective, ObjectiveOptions

_MODULES = {
    "sit": ("vrpo.objectives.sit", "SiT"),
    "ddpm": ("vrpo.objectives.ddpm", "DDPM"),
    "repa": ("vrpo.objectives.repa", "REPA"),
    "vrpo": ("vrpo.objectives.vrpo", "VRPO"),
    "irepa": ("vrpo.objectives.irepa", "IREPA"),
    "layersync": ("vrpo.objectives.layersync", "LayerSync"),
    "dispersive": ("vrpo.objectives.dispersive", "Dispersive"),
    "sra": ("vrpo.objectives.sra", "SRA"),
    "reg": ("vrpo.objectives.reg", "REG"),
    "redi": ("vrpo.objectives.redi", "ReDi"),
    "deepflow": ("vrpo.objectives.deepflow", "DeepFlow"),
}


def objective_class(name: str) -> type[Objective]:
    if name not in _MODULES:
        match = difflib.get_close_matches(name, list(_MODULES), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ConfigError(f"unknown objective '{name}'{hint}; available: {', '.join(_MODULES)}")
    module, cls = _MODULES[name]
    return getattr(importlib.import_module(module), cls)


def objective_options(name: str) -> type[ObjectiveOptions]:
    return objective_class(name).Options


def build_objective(cfg, model, data=None) -> Objective:
    """The configured objective; ``data`` lets methods with a feature cache verify it."""
    return objective_class(cfg.objective.name)(cfg.objective, cfg, model, data)


def available_objectives() -> list[str]:
    return list(_MODULES)


__all__ = [
    "Batch",
    "DenoisingStep",
    "LossOutput",
    "Objective",
    "ObjectiveOptions",
    "available_objectives",
    "build_objective",
    "objective_class",
    "objective_options",
]
