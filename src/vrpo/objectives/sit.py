"""SiT: flow matching on an interpolant, the flow family's plain denoising objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vrpo.objectives.base import Objective, ObjectiveOptions


@dataclass
class SiTOptions(ObjectiveOptions):
    name: str = "sit"
    families: ClassVar[tuple[str, ...]] = ("flow",)


class SiT(Objective):
    name = "sit"
    Options = SiTOptions
