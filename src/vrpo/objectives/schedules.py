"""The alignment weight over training: constant, a linear or cosine decay to 0, or switched off
at a step (HASTE stops REPA's alignment at 250K of 400K steps). Every alignment method's options
derive from ``ScheduledOptions`` and multiply their weight by ``alignment_scale(step)``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vrpo.errors import ConfigError
from vrpo.objectives.base import ObjectiveOptions

SCHEDULES = ("constant", "linear", "cosine", "stop")


@dataclass
class ScheduledOptions(ObjectiveOptions):
    schedule: str = "constant"  # linear / cosine: decay to 0 at schedule_end; stop: 1 until schedule_end, then 0
    schedule_end: int = 0  # the step of the schedule's end (not constant)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"objective.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule != "constant" and self.schedule_end < 1:
            raise ConfigError(f"objective.schedule={self.schedule} needs objective.schedule_end >= 1 (a step)")

    def leaves_parameters_unused(self) -> bool:
        return self.schedule != "constant"  # at 0 the alignment and its heads are not computed

    def alignment_scale(self, step: int) -> float:
        """The factor on the alignment weight at optimizer step ``step`` (0-based)."""
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "stop":
            return 1.0 if step < self.schedule_end else 0.0
        done = min(step / self.schedule_end, 1.0)
        return 1.0 - done if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))

    def logged_scale(self, record: dict[str, float]) -> float:
        """The factor during a training-log record (its ``step`` counts the steps done by its end)."""
        return self.alignment_scale(max(int(record.get("step", 1)) - 1, 0))
