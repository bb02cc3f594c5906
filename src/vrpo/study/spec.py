"""`vrpo study`'s specification: a grid of (method x seed) on one model, budget and evaluation schedule.

Seeds are paired: run (method, seed) trains with ``train.seed = seed``, so every method of a
seed starts from the same weights and sees the same data order, timesteps and noise, and
is evaluated on the same sampling noise. Each run is an ordinary run folder: an interrupted
study resumes the unfinished run from its checkpoint and skips finished runs.

A finished run's small outputs (config, metrics, log, timing, representation metrics) are
copied to the study's ``archive`` (in the work tree, to be committed), and a run found
there is not redone: a study survives the loss of its run folders (a replaced machine).
A run whose resolved config matches a run archived by another study beside it (an ablation's
default row and the main comparison's VRPO) reuses that archive instead of training again.
The report (markdown: final table, paired differences against the baseline with 95 %
intervals, curves, speed-up, step time) and a PNG are rewritten after every run, and the
study's summary block in ``index`` (docs/results.md) is replaced.

Study file (YAML; ``extends: OTHER.yaml`` inherits another file's keys and adds to its ``set``):
    name: regime-t4
    out: ~/vrpo-study/regime-t4        # run folders (outside the work tree)
    report: docs/results/regime-t4.md   # written with a PNG beside it
    base: configs/fmnist/repa-t4.yaml   # the config every method starts from
    set: [train.max_steps=2000, eval.every=500]   # overrides for all methods
    baseline: sit                       # paired differences are taken against it
    contrasts: [[vrpo, repa]]           # further paired differences (method, reference)
    seeds: [0, 1, 2]
    metric: fid                         # the headline metric (lower is better)
    metrics: [fid, fd_efficientnet, ra] # everything the report tabulates
    speedup: {reference: repa, metric: fd_efficientnet}  # steps to reach the reference's final value (or a list)
    curve_steps: [900]                  # more curve points, evaluated after training from kept checkpoints
    representations: {metrics: [ra, cknna], num: 500, transfer: digits}  # after each run, EMA weights
    methods:                            # name -> overrides
      sit: ["objective={name: sit}"]
      repa: []
    imported: {vrpo-v1: docs/results/other/vrpo}  # another study's archived runs, shown, never trained
    selection: {groups: {repa: [repa-0.5, repa-1]}, metric: fid, require: {ra: 0.5}, tie: 1.0}  # selection.py
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vrpo.config import build_section, load_config, read_yaml_tree
from vrpo.errors import ConfigError
from vrpo.runs import load_run_config
from vrpo.study.selection import check_selection


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
    # method -> the archive folder (seed0/, seed1/, ...) of a finished run of another study: its numbers
    # are shown beside this study's methods (after them), and it is never trained here
    imported: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)  # a rule choosing one method per group (study/selection.py)
    contrasts: list = field(default_factory=list)  # [[method, reference], ...] beyond those against the baseline
    metric: str = "fid"  # the headline metric (lower is better)
    metrics: list[str] = field(default_factory=list)  # tabulated metrics; empty: [metric]
    archive: str = ""  # small outputs of finished runs; "": beside the report, in a folder named after it
    index: str = "docs/results.md"  # the study's summary block is kept up to date there; "": none
    speedup: dict = field(default_factory=dict)  # {reference: METHOD or [METHOD, ...], metric: KEY}
    representations: dict = field(default_factory=dict)  # {metrics, num, timesteps, transfer: DATASET}
    final: dict = field(default_factory=dict)  # {num_samples, metrics}: a larger evaluation of the final EMA weights
    curve_steps: list[int] = field(
        default_factory=list
    )  # further curve points, evaluated after training from kept checkpoints

    @property
    def speedup_references(self) -> list[str]:
        """The methods whose final value the speed-up is measured against (one, or a list)."""
        ref = self.speedup.get("reference")
        return [] if ref is None else list(ref) if isinstance(ref, list) else [ref]

    @property
    def report_metrics(self) -> list[str]:
        return list(dict.fromkeys([self.metric, *self.metrics]))

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(method, reference) of every paired difference the report takes."""
        against_baseline = [(m, self.baseline) for m in self.methods if m != self.baseline]
        return list(dict.fromkeys([*against_baseline, *(tuple(c) for c in self.contrasts)]))


REPRESENTATION_KEYS = {"metrics", "num", "timesteps", "transfer"}

FINAL_KEYS = {"num_samples", "metrics"}

ARCHIVED = (
    "config.yaml",
    "metrics.jsonl",
    "log.jsonl",
    "warnings.jsonl",
    "attempts.jsonl",
    "timing.jsonl",
    "representations.json",
    "final_eval.json",
)


def merge_study(parent: dict, child: dict) -> dict:
    """A study's ``set`` extends its parent's; every other key is replaced."""
    return {**parent, **child, "set": [*parent.get("set", []), *child.get("set", [])]}


def load_study(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    tree = read_yaml_tree(path, "study", merge_study)
    spec = build_section(StudySpec, tree, "study")
    spec.set = [*spec.set, *overrides]
    if not spec.methods:
        raise ConfigError("study.methods is empty: name at least one method with its overrides")
    for name, folder in spec.imported.items():
        if name in spec.methods:
            raise ConfigError(f"study.imported.{name} is also one of the study's methods: name it once")
        if not Path(folder).is_dir():
            raise ConfigError(f"study.imported.{name}: no archive folder {folder}")
        spec.methods[name] = None  # listed with the others in every table
    if spec.baseline not in spec.methods:
        raise ConfigError(f"study.baseline '{spec.baseline}' is not one of the methods {sorted(spec.methods)}")
    if spec.speedup and (not spec.speedup_references or set(spec.speedup_references) - set(spec.methods)):
        raise ConfigError(
            f"study.speedup.reference must be one of the methods {sorted(spec.methods)} or a list of them, got "
            f"{spec.speedup.get('reference')!r}"
        )
    if set(spec.speedup) - {"reference", "metric"}:
        raise ConfigError(
            f"unknown study.speedup key(s) {sorted(set(spec.speedup) - {'reference', 'metric'})}: use reference, metric"
        )
    if set(spec.final) - FINAL_KEYS or (spec.final and int(spec.final.get("num_samples", 0)) < 2):
        raise ConfigError(f"study.final takes num_samples (>= 2) and metrics, got {spec.final}")
    if set(spec.representations) - REPRESENTATION_KEYS:
        raise ConfigError(
            f"unknown study.representations key(s) {sorted(set(spec.representations) - REPRESENTATION_KEYS)}: use "
            f"{sorted(REPRESENTATION_KEYS)}"
        )
    for pair in spec.contrasts:
        if not (isinstance(pair, list) and len(pair) == 2 and set(pair) <= set(spec.methods) and pair[0] != pair[1]):
            raise ConfigError(
                "study.contrasts takes [method, reference] pairs of two different methods out of "
                f"{sorted(spec.methods)}, got {pair!r}"
            )
    check_selection(spec.selection, spec.methods)
    for name in (m for m in spec.methods if m not in spec.imported):
        cfg = method_config(spec, name, spec.seeds[0])  # validate every method before any compute
        t = cfg.train
        saved = list(range(t.ckpt_every, t.max_steps, t.ckpt_every)) if t.ckpt_every > 0 else []
        kept = saved[max(0, len(saved) - (t.keep_last - 1)) :]  # besides the final one
        for step in spec.curve_steps:
            if step not in kept:
                raise ConfigError(
                    f"study.curve_steps: {step!r} is not a checkpoint that {name}'s run keeps "
                    f"(train.ckpt_every={t.ckpt_every}, keep_last={t.keep_last}, max_steps={t.max_steps}: {kept})"
                )
    return spec


def method_config(spec: StudySpec, method: str, seed: int):
    if method in spec.imported:
        raise ConfigError(f"study method {method} is imported from {spec.imported[method]}: it has no config here")
    overrides = spec.methods[method] or []
    if not isinstance(overrides, list):
        raise ConfigError(f"study.methods.{method} must be a list of KEY=VALUE overrides")
    return load_config(spec.base, [*spec.set, *overrides, f"train.seed={seed}"])


def run_dir(spec: StudySpec, method: str, seed: int) -> Path:
    return Path(spec.out).expanduser() / method / f"seed{seed}"


def archive_root(spec: StudySpec) -> Path:
    return Path(spec.archive) if spec.archive else Path(spec.report).with_suffix("")


def archive_dir(spec: StudySpec, method: str, seed: int) -> Path:
    return archive_root(spec) / method / f"seed{seed}"


def archived_final_step(folder: Path, spec: StudySpec | None = None) -> int | None:
    """The step of a finished run's archive (its timing file is written last), None when incomplete
    (or, given ``spec``, when it lacks the study's representation or final evaluation)."""
    if not (folder / "timing.jsonl").is_file() or not (folder / "config.yaml").is_file():
        return None
    if spec is not None and (
        (spec.representations and not (folder / "representations.json").is_file())
        or (spec.final and not (folder / "final_eval.json").is_file())
    ):
        return None
    return load_run_config(folder).train.max_steps


def source_dir(spec: StudySpec, method: str, seed: int) -> Path:
    """Where a run's numbers are read from: its archive once finished, else its run folder."""
    if method in spec.imported:
        return Path(spec.imported[method]) / f"seed{seed}"
    archived = archive_dir(spec, method, seed)
    return archived if archived_final_step(archived) is not None else run_dir(spec, method, seed)


# what a run keeps on disk, not what it trains: two runs that differ only here are the same run
BOOKKEEPING_KEYS = {"train": ("ckpt_every", "keep_last", "progress")}


def trained_config(tree: dict) -> dict:
    """A resolved config as plain data without its bookkeeping keys."""
    tree = yaml.safe_load(yaml.safe_dump(tree, sort_keys=False))
    for section, keys in BOOKKEEPING_KEYS.items():
        for key in keys:
            tree.get(section, {}).pop(key, None)
    return tree


def archived_twin(spec: StudySpec, cfg, seed: int) -> Path | None:
    """A finished run of another study, archived beside this one's, with the same resolved config up
    to its checkpoint cadence: its weights and numbers are this run's (training is deterministic and
    resumes bit-identically), so it is reused, not retrained."""
    own = archive_root(spec)
    want = trained_config(cfg.to_dict())
    for config in sorted(own.parent.glob(f"*/*/seed{seed}/config.yaml")):
        folder = config.parent
        # read as a run folder: keys added since it was written take their defaults, which keep the
        # behaviour it ran with (and a VRPO run from before version 2 reads as spec 1)
        if folder.parents[1] == own:
            continue
        try:
            same = archived_final_step(folder) == cfg.train.max_steps and want == trained_config(
                load_run_config(folder).to_dict()
            )
        except ConfigError:  # a folder whose config no longer loads (another version's keys) is no twin
            continue
        if same:
            return folder
    return None
