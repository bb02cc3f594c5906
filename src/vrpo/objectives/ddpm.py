"""DiT's objective: DDPM with eps prediction and a learned variance (MSE + variational bound)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vrpo.objectives.base import Objective, ObjectiveOptions


@dataclass
class DDPMOptions(ObjectiveOptions):
    name: str = "ddpm"
    families: ClassVar[tuple[str, ...]] = ("ddpm",)


class DDPM(Objective):
    name = "ddpm"
    Options = DDPMOptions
