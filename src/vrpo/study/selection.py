"""A study's selection rule, applied to its results: which candidate of each group it chooses.

    selection:
      groups: {repa: [repa-0.5, repa-1, repa-2]}   # candidates, the preferred one (on ties) first
      metric: fid            # lower is better; the mean over the study's seeds of the final value
      require: {ra: 0.5}     # a candidate is kept only where each of these is above its minimum
      tie: 1.0               # candidates within this of the best go to the first one listed

The rule is fixed in the study file before any run; the report says what it chose, and until
every candidate is measured that the choice is provisional.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vrpo.errors import ConfigError

SELECTION_KEYS = {"groups", "metric", "require", "tie"}


@dataclass
class Choice:
    group: str
    chosen: str | None  # None: no candidate measured and kept
    value: float | None
    measured: int  # candidates with the metric
    candidates: int
    excluded: list[str]  # measured, but below a requirement


def check_selection(selection: dict, methods) -> None:
    if not selection:
        return
    if set(selection) - SELECTION_KEYS or not isinstance(selection.get("groups"), dict):
        raise ConfigError(f"study.selection takes groups (a mapping) and {sorted(SELECTION_KEYS - {'groups'})}")
    for group, members in selection["groups"].items():
        if not isinstance(members, list) or not members or set(members) - set(methods):
            raise ConfigError(f"study.selection.groups.{group} must list methods of the study, got {members!r}")


def mean_final(runs: dict, key: str) -> float | None:
    values = [v for r in runs.values() if (v := r.value(key)) is not None]
    return float(np.mean(values)) if values else None


def above(value: float | None, low: float) -> bool:
    return value is not None and value > low


def choose(spec, data) -> list[Choice]:
    rule = spec.selection
    metric, require, tie = rule.get("metric", spec.metric), rule.get("require", {}), float(rule.get("tie", 0.0))
    choices = []
    for group, members in rule.get("groups", {}).items():
        scores = {m: mean_final(data[m], metric) for m in members}
        measured = [m for m in members if scores[m] is not None]
        kept = [m for m in measured if all(above(mean_final(data[m], k), low) for k, low in require.items())]
        best = min((scores[m] for m in kept), default=None)
        chosen = next((m for m in kept if scores[m] <= best + tie), None) if best is not None else None
        excluded = [m for m in measured if m not in kept]
        value = scores[chosen] if chosen else None
        choices.append(Choice(group, chosen, value, len(measured), len(members), excluded))
    return choices


def selection_lines(spec, data) -> list[str]:
    if not spec.selection:
        return []
    rule = spec.selection
    metric = rule.get("metric", spec.metric)
    lines = [
        "## Selection",
        "",
        f"The study's rule: per group, the lowest mean final {metric} among the candidates with "
        + (", ".join(f"{k} > {v}" for k, v in rule.get("require", {}).items()) or "no requirement")
        + f"; candidates within {rule.get('tie', 0)} of the best go to the first one listed.",
        "",
        f"| group | chosen | {metric} | candidates measured | excluded by the requirement | status |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in choose(spec, data):
        status = "final" if c.measured == c.candidates else "provisional"
        value = f"{c.value:.2f}" if c.value is not None else "-"
        excluded = ", ".join(c.excluded) or "-"
        lines.append(
            f"| {c.group} | {c.chosen or '-'} | {value} | {c.measured}/{c.candidates} | {excluded} | {status} |"
        )
    return lines + [""]
