"""What a study reads of its runs: evaluations, step times, wall time and representation metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vrpo.config import Config
from vrpo.runs import load_run_config, read_log, read_metrics
from vrpo.study.spec import StudySpec, method_config, source_dir

# Below this in-domain RA (an alignment that collapsed) retention is a ratio of two near-zero
# cosines, noise that would read as "better": the report leaves it out.
RETENTION_MIN_RA = 0.25


@dataclass
class RunRecord:
    """What the report needs of one (method, seed) run."""

    metrics: dict[int, dict]  # step -> evaluation record
    seconds_per_step: float | None  # median over the training log's windows
    wall_s: float  # training wall time (sum over interruptions)
    representations: dict  # in_domain / transfer -> evaluate_representations result
    log: list[dict] = field(default_factory=list)  # the training log's records
    # alignment term -> [(step, the coefficient on it in the loss)], from the log through the objective
    coefficients: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # adaptive quantity (lambda_s, w_k) -> [(step, value)], likewise
    schedule: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    # trained to the end (its timing file is written then): only finished runs have final values
    finished: bool = True
    # the one machine every training attempt ran on; None when unrecorded (older runs) or several
    machine: str | None = None

    def value(self, key: str, step: int | None = None):
        """An evaluation metric at ``step`` (default: the last step that has it), a representation
        metric: ``ra``, ``cknna`` (in-domain), ``transfer_ra``, ``ra_retention`` (transfer / in-domain RA,
        only where the in-domain RA reaches RETENTION_MIN_RA),
        or ``var:KEY``: the variance of a logged training quantity over the second half of training."""
        if key.startswith("var:"):
            last = max((r["step"] for r in self.log), default=0)
            values = [r[key[4:]] for r in self.log if r["step"] >= last / 2 and r.get(key[4:]) is not None]
            return float(np.var(values, ddof=1)) if step is None and len(values) > 1 else None
        rep_in, rep_out = self.representations.get("in_domain", {}), self.representations.get("transfer", {})
        retained = rep_out.get("ra") is not None and (rep_in.get("ra") or 0.0) >= RETENTION_MIN_RA
        derived = {
            "transfer_ra": rep_out.get("ra"),
            "transfer_cknna": rep_out.get("cknna"),
            "ra_retention": 100.0 * rep_out["ra"] / rep_in["ra"] if retained else None,
        }
        if key in derived:
            return derived[key] if step is None else None
        if step is None:
            if key in ("ra", "cknna") and rep_in.get(key) is not None:
                return rep_in[key]
            steps = [st for st, r in self.metrics.items() if r.get(key) is not None]
            return self.metrics[max(steps)][key] if steps else None
        return self.metrics.get(step, {}).get(key)

    def curve(self, key: str) -> list[tuple[int, float]]:
        return sorted((st, r[key]) for st, r in self.metrics.items() if r.get(key) is not None)


def training_wall_s(folder: Path, log: list[dict]) -> float:
    """Training wall time over all attempts, killed ones included: a completed attempt counts its
    measured time (timing.jsonl), a killed one runs from its start to its last line of ``log``
    (the run's training log). Runs from before attempts.jsonl existed count only completed attempts."""
    completed = read_log(folder / "timing.jsonl")
    starts = sorted(r["start"] for r in read_log(folder / "attempts.jsonl"))
    if not starts:
        return sum(r["wall_s"] for r in completed)
    logged = [r["time"] for r in log]
    total = 0.0
    for start, end in zip(starts, starts[1:] + [math.inf]):
        done = [r["wall_s"] for r in completed if start <= r["at"] < end]
        total += done[0] if done else max((t for t in logged if start <= t < end), default=start) - start
    return total


def training_machine(folder: Path) -> str | None:
    """The machine of every training attempt of a run, None if any attempt did not record it or they differ."""
    machines = {r.get("machine") for r in read_log(folder / "attempts.jsonl")}
    return machines.pop() if len(machines) == 1 else None


def logged_curves(read, log: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value)] of a run's training log, ``read`` (an objective's
    ``alignment_coefficients`` or ``alignment_schedule``) naming the values in one record."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in log:
        for name, value in read(record).items():
            curves.setdefault(name, []).append((record["step"], float(value)))
    return curves


def read_run(folder: Path, cfg: Config | None) -> RunRecord:
    """A run's record; ``cfg`` (its config) gives the batch of its step time and its objective."""
    log = read_log(folder / "log.jsonl")
    batch_size = cfg.train.batch_size if cfg is not None else 0
    rates = [r["images_per_s"] for r in log if r.get("images_per_s")]
    reps, final = folder / "representations.json", folder / "final_eval.json"
    metrics = read_metrics(folder)
    if final.is_file():
        record = json.loads(final.read_text())
        metrics.setdefault(int(record["step"]), {}).update(record)
    return RunRecord(
        metrics=metrics,
        seconds_per_step=batch_size / float(np.median(rates)) if rates else None,
        wall_s=training_wall_s(folder, log),
        representations=json.loads(reps.read_text()) if reps.is_file() else {},
        log=log,
        coefficients=logged_curves(cfg.objective.alignment_coefficients, log) if cfg is not None else {},
        schedule=logged_curves(cfg.objective.alignment_schedule, log) if cfg is not None else {},
        finished=(folder / "timing.jsonl").is_file(),
        machine=training_machine(folder),
    )


def collect(spec: StudySpec) -> dict[str, dict[int, RunRecord]]:
    """method -> seed -> run record, runs in progress included (their curve points are real)."""
    out: dict[str, dict[int, RunRecord]] = {}
    for m in spec.methods:
        cfg = run_config(spec, m)
        out[m] = {s: read_run(source_dir(spec, m, s), cfg) for s in spec.seeds}
    return out


def run_config(spec: StudySpec, method: str) -> Config | None:
    """A method's config; an imported one's from the run folder its archive holds (None if none has one)."""
    if method not in spec.imported:
        return method_config(spec, method, spec.seeds[0])
    folders = [source_dir(spec, method, seed) for seed in spec.seeds]
    return next((load_run_config(f) for f in folders if (f / "config.yaml").is_file()), None)


def finished_runs(data) -> dict[str, dict[int, RunRecord]]:
    """``data`` without the runs still in progress: a final value, a step time or a speed-up of a
    run that has not reached its last step would read as the run's result."""
    return {m: {s: r for s, r in runs.items() if r.finished} for m, runs in data.items()}


def measured_steps(data, key: str) -> list[int]:
    """The steps at which any run of the study has ``key``."""
    return sorted({st for runs in data.values() for r in runs.values() for st, _ in r.curve(key)})
