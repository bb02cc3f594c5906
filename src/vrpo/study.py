"""`vrpo study`: a grid of (method x seed) on one model, budget and evaluation schedule.

Seeds are paired: run (method, seed) trains with ``train.seed = seed``, so every method of a
seed starts from the same weights and sees the same data order, timesteps and noise, and
is evaluated on the same sampling noise. Each run is an ordinary run folder: an interrupted
study resumes the unfinished run from its checkpoint and skips finished runs. The report
(markdown with mean and 95 % interval per method, paired differences against a baseline)
and plots are rewritten from the runs' metrics files after every run.

Study file (YAML):
    name: regime-t4
    out: ~/vrpo-study/regime-t4        # run folders (outside the work tree)
    report: docs/results/regime-t4.md   # written with a PNG beside it
    base: configs/fmnist/repa-t4.yaml   # the config every method starts from
    set: [train.max_steps=2000, eval.every=500]   # overrides for all methods
    baseline: sit                       # paired differences are taken against it
    seeds: [0, 1, 2]
    methods:                            # name -> overrides
      sit: ["objective={name: sit}"]
      repa: []
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vrpo.config import ConfigError, build_section, load_config


@dataclass
class StudySpec:
    name: str = "study"
    out: str = "~/vrpo-study/study"
    report: str = "docs/results.md"
    base: str = "configs/fmnist/repa-t4.yaml"
    set: list[str] = field(default_factory=list)
    baseline: str = "sit"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: dict = field(default_factory=dict)
    metric: str = "fid"  # the metric compared in the report (lower is better)


def load_study(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found")
    tree = yaml.safe_load(path.read_text()) or {}
    spec = build_section(StudySpec, tree, "study")
    spec.set = [*spec.set, *overrides]
    if not spec.methods:
        raise ConfigError("study.methods is empty: name at least one method with its overrides")
    if spec.baseline not in spec.methods:
        raise ConfigError(f"study.baseline '{spec.baseline}' is not one of the methods {sorted(spec.methods)}")
    for name in spec.methods:
        method_config(spec, name, spec.seeds[0])  # validate every method before any compute
    return spec


def method_config(spec: StudySpec, method: str, seed: int):
    overrides = spec.methods[method] or []
    if not isinstance(overrides, list):
        raise ConfigError(f"study.methods.{method} must be a list of KEY=VALUE overrides")
    return load_config(spec.base, [*spec.set, *overrides, f"train.seed={seed}"])


def run_dir(spec: StudySpec, method: str, seed: int) -> Path:
    return Path(spec.out).expanduser() / method / f"seed{seed}"


def ensure_feature_cache(cfg) -> None:
    """Build the alignment method's feature cache when the config names one that is missing."""
    from vrpo.data import load_dataset
    from vrpo.encoders.cache import MANIFEST, build_cache, cache_slug
    from vrpo.objectives.alignment import AlignmentOptions, build_alignment_encoders

    options = cfg.objective
    if not isinstance(options, AlignmentOptions) or not options.feature_cache:
        return
    data = None
    for encoder in build_alignment_encoders(options, cfg.data.resolution):
        folder = Path(options.feature_cache) / cache_slug(encoder)
        manifest = folder / MANIFEST
        if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
            continue
        data = data or load_dataset(cfg.data)
        build_cache(folder, encoder, data)


def run_study(spec: StudySpec, log=print) -> Path:
    from vrpo.train import train
    from vrpo.train.checkpoint import latest_checkpoint

    for seed in spec.seeds:  # seed-major: a partial study already holds complete pairs
        for method in spec.methods:
            cfg = method_config(spec, method, seed)
            folder = run_dir(spec, method, seed)
            done = latest_checkpoint(folder) if folder.exists() else None
            if done is not None and done.step >= cfg.train.max_steps:
                continue
            log(f"[study {spec.name}] {method} seed {seed} -> {folder}")
            ensure_feature_cache(cfg)
            start = time.time()
            train(cfg, folder)
            _append_timing(folder, time.time() - start)
            write_report(spec)
    return write_report(spec)


def _append_timing(folder: Path, seconds: float) -> None:
    with open(folder / "timing.jsonl", "a") as f:
        f.write(json.dumps({"wall_s": seconds, "at": time.time()}) + "\n")


# ---------------------------------------------------------------- statistics

def t_critical(df: int) -> float:
    """Two-sided 95 % Student-t quantile."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
        return table.get(df, 1.96 + 2.4 / df)


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of the 95 % interval (nan half-width for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), t_critical(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


def read_metrics(folder: Path) -> dict[int, dict]:
    from vrpo.train.logging import read_log

    return {int(r["step"]): r for r in read_log(folder / "metrics.jsonl")}


def collect(spec: StudySpec) -> dict[str, dict[int, dict[int, dict]]]:
    """method -> seed -> step -> metrics record."""
    return {m: {s: read_metrics(run_dir(spec, m, s)) for s in spec.seeds} for m in spec.methods}


def write_report(spec: StudySpec) -> Path:
    data = collect(spec)
    metric = spec.metric
    report = Path(spec.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Study {spec.name}", "", f"Base config `{spec.base}`, overrides `{' '.join(spec.set)}`; seeds {spec.seeds} (paired).", ""]
    steps = sorted({st for runs in data.values() for recs in runs.values() for st in recs})
    lines += [f"## {metric} against steps (mean +- 95 % interval over seeds; n = seeds measured)", ""]
    lines += ["| step | " + " | ".join(spec.methods) + " |", "| --- |" + " --- |" * len(spec.methods)]
    for st in steps:
        cells = []
        for m in spec.methods:
            vals = [recs[st][metric] for recs in data[m].values() if st in recs and recs[st].get(metric) is not None]
            mean, half = mean_ci(vals) if vals else (float("nan"), float("nan"))
            cells.append(f"{mean:.2f} +- {half:.2f} (n={len(vals)})" if vals else "-")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += ["", f"## Paired differences against {spec.baseline} at each step ({metric}; negative = better than {spec.baseline})", ""]
    lines += ["| method | step | mean difference | 95 % interval | seeds | interval excludes 0 |", "| --- | --- | --- | --- | --- | --- |"]
    for m in spec.methods:
        if m == spec.baseline:
            continue
        for st in steps:
            diffs = [data[m][s][st][metric] - data[spec.baseline][s][st][metric] for s in spec.seeds
                     if st in data[m][s] and st in data[spec.baseline][s]
                     and data[m][s][st].get(metric) is not None and data[spec.baseline][s][st].get(metric) is not None]
            if not diffs:
                continue
            mean, half = mean_ci(diffs)
            excludes = "yes" if len(diffs) > 1 and abs(mean) > half else "no"
            lines.append(f"| {m} | {st} | {mean:+.2f} | [{mean - half:+.2f}, {mean + half:+.2f}] | {len(diffs)} | {excludes} |")
    lines += ["", "Per-run metrics: `metrics.jsonl` in each run folder under the study's `out`."]
    report.write_text("\n".join(lines) + "\n")
    _plot(spec, data, report.with_suffix(".png"))
    return report


def _plot(spec: StudySpec, data, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, runs in data.items():
        steps = sorted({st for recs in runs.values() for st in recs})
        stats = [mean_ci([r[st][spec.metric] for r in runs.values() if st in r and r[st].get(spec.metric) is not None]) for st in steps]
        if not steps:
            continue
        mean = np.array([s[0] for s in stats])
        half = np.nan_to_num(np.array([s[1] for s in stats]))
        ax.plot(steps, mean, marker="o", label=m)
        ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric)
    ax.set_title(spec.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
