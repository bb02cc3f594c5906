"""`vrpo study`: a grid of (method x seed) on one model, budget and evaluation schedule.

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
    speedup: {reference: repa, metric: fd_efficientnet}  # steps to reach the reference's final value
    curve_steps: [900]                  # more curve points, evaluated after training from kept checkpoints
    representations: {metrics: [ra, cknna], num: 500, transfer: digits}  # after each run, EMA weights
    methods:                            # name -> overrides
      sit: ["objective={name: sit}"]
      repa: []
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vrpo.config import ConfigError, build_section, load_config, read_yaml_tree


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
    contrasts: list = field(default_factory=list)  # [[method, reference], ...] beyond those against the baseline
    metric: str = "fid"  # the headline metric (lower is better)
    metrics: list[str] = field(default_factory=list)  # tabulated metrics; empty: [metric]
    archive: str = ""  # small outputs of finished runs; "": beside the report, in a folder named after it
    index: str = "docs/results.md"  # the study's summary block is kept up to date there; "": none
    speedup: dict = field(default_factory=dict)  # {reference: METHOD, metric: KEY (default: metric)}
    representations: dict = field(default_factory=dict)  # {metrics, num, timesteps, transfer: DATASET}
    final: dict = field(default_factory=dict)  # {num_samples, metrics}: a larger evaluation of the final EMA weights
    curve_steps: list[int] = field(default_factory=list)  # further curve points, evaluated after training from kept checkpoints

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
ARCHIVED = ("config.yaml", "metrics.jsonl", "log.jsonl", "warnings.jsonl", "attempts.jsonl", "timing.jsonl",
            "representations.json", "final_eval.json")


def merge_study(parent: dict, child: dict) -> dict:
    """A study's ``set`` extends its parent's; every other key is replaced."""
    return {**parent, **child, "set": [*parent.get("set", []), *child.get("set", [])]}


def load_study(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    tree = read_yaml_tree(path, "study", merge_study)
    spec = build_section(StudySpec, tree, "study")
    spec.set = [*spec.set, *overrides]
    if not spec.methods:
        raise ConfigError("study.methods is empty: name at least one method with its overrides")
    if spec.baseline not in spec.methods:
        raise ConfigError(f"study.baseline '{spec.baseline}' is not one of the methods {sorted(spec.methods)}")
    if spec.speedup and spec.speedup.get("reference") not in spec.methods:
        raise ConfigError(f"study.speedup.reference must be one of the methods {sorted(spec.methods)}, got {spec.speedup.get('reference')!r}")
    if set(spec.speedup) - {"reference", "metric"}:
        raise ConfigError(f"unknown study.speedup key(s) {sorted(set(spec.speedup) - {'reference', 'metric'})}: use reference, metric")
    if set(spec.final) - FINAL_KEYS or (spec.final and int(spec.final.get("num_samples", 0)) < 2):
        raise ConfigError(f"study.final takes num_samples (>= 2) and metrics, got {spec.final}")
    if set(spec.representations) - REPRESENTATION_KEYS:
        raise ConfigError(f"unknown study.representations key(s) {sorted(set(spec.representations) - REPRESENTATION_KEYS)}: use {sorted(REPRESENTATION_KEYS)}")
    for pair in spec.contrasts:
        if not (isinstance(pair, list) and len(pair) == 2 and set(pair) <= set(spec.methods) and pair[0] != pair[1]):
            raise ConfigError(f"study.contrasts takes [method, reference] pairs of two different methods out of {sorted(spec.methods)}, got {pair!r}")
    for name in spec.methods:
        cfg = method_config(spec, name, spec.seeds[0])  # validate every method before any compute
        t = cfg.train
        saved = list(range(t.ckpt_every, t.max_steps, t.ckpt_every)) if t.ckpt_every > 0 else []
        kept = saved[max(0, len(saved) - (t.keep_last - 1)):]  # besides the final one
        for step in spec.curve_steps:
            if step not in kept:
                raise ConfigError(f"study.curve_steps: {step!r} is not a checkpoint that {name}'s run keeps "
                                  f"(train.ckpt_every={t.ckpt_every}, keep_last={t.keep_last}, max_steps={t.max_steps}: {kept})")
    return spec


def method_config(spec: StudySpec, method: str, seed: int):
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
    if spec is not None and ((spec.representations and not (folder / "representations.json").is_file())
                             or (spec.final and not (folder / "final_eval.json").is_file())):
        return None
    return int(yaml.safe_load((folder / "config.yaml").read_text())["train"]["max_steps"])


def source_dir(spec: StudySpec, method: str, seed: int) -> Path:
    """Where a run's numbers are read from: its archive once finished, else its run folder."""
    archived = archive_dir(spec, method, seed)
    return archived if archived_final_step(archived) is not None else run_dir(spec, method, seed)


def archived_twin(spec: StudySpec, cfg, seed: int) -> Path | None:
    """A finished run of another study, archived beside this one's, with the same resolved config:
    its weights and numbers are this run's (training is deterministic), so it is reused, not retrained."""
    own = archive_root(spec)
    want = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for config in sorted(own.parent.glob(f"*/*/seed{seed}/config.yaml")):
        folder = config.parent
        if folder.parents[1] != own and archived_final_step(folder) == cfg.train.max_steps \
                and yaml.safe_load(config.read_text()) == want:
            return folder
    return None


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


def run_study(spec: StudySpec, log=print, only_seeds=None, only_methods=None) -> Path:
    from vrpo.train import train
    from vrpo.train.checkpoint import latest_checkpoint, step_dir
    from vrpo.train.logging import append_record

    if only_seeds is not None and set(only_seeds) - set(spec.seeds):
        raise ConfigError(f"--seeds {sorted(set(only_seeds) - set(spec.seeds))} not in the study's seeds {spec.seeds}")
    if only_methods is not None and set(only_methods) - set(spec.methods):
        raise ConfigError(f"--methods {sorted(set(only_methods) - set(spec.methods))} not in the study's methods {list(spec.methods)}")
    for seed in spec.seeds:  # seed-major: a partial study already holds complete pairs
        if only_seeds is not None and seed not in only_seeds:
            continue
        for method in spec.methods:
            if only_methods is not None and method not in only_methods:
                continue
            cfg = method_config(spec, method, seed)
            archive = archive_dir(spec, method, seed)
            if archived_final_step(archive) is None and (twin := archived_twin(spec, cfg, seed)) is not None:
                log(f"[study {spec.name}] {method} seed {seed}: the same run is archived in {twin}; reusing it")
                shutil.copytree(twin, archive, dirs_exist_ok=True)
            folder = run_dir(spec, method, seed)
            if archived_final_step(archive, spec) == cfg.train.max_steps:
                missing = missing_curve_steps(spec, archive)
                if not missing:
                    continue
                if not all(step_dir(folder, s).is_dir() for s in missing):
                    log(f"[study {spec.name}] {method} seed {seed}: curve steps {missing} not evaluated, "
                        f"their checkpoints are no longer in {folder} (the study does not retrain for them)")
                    continue
            else:
                done = latest_checkpoint(folder) if folder.exists() else None
                if done is None or done.step < cfg.train.max_steps or not (folder / "timing.jsonl").is_file():
                    log(f"[study {spec.name}] {method} seed {seed} -> {folder}")
                    ensure_feature_cache(cfg)
                    start = time.time()
                    append_record(folder / "attempts.jsonl", {"start": start})  # a killed attempt still counts
                    train(cfg, folder)
                    append_record(folder / "timing.jsonl", {"wall_s": time.time() - start, "at": time.time()})
                if spec.representations:
                    log(f"[study {spec.name}] representations of {method} seed {seed}")
                    measure_representations(spec, folder)
                if spec.final:
                    log(f"[study {spec.name}] final evaluation of {method} seed {seed}")
                    final_evaluation(spec, cfg, folder)
            if missing := missing_curve_steps(spec, folder):
                log(f"[study {spec.name}] curve steps {missing} of {method} seed {seed}")
                evaluate_curve_steps(cfg, folder, missing)
            archive_run(folder, archive)
            write_report(spec)
    return write_report(spec)


def training_wall_s(folder: Path, log: list[dict]) -> float:
    """Training wall time over all attempts, killed ones included: a completed attempt counts its
    measured time (timing.jsonl), a killed one runs from its start to its last line of ``log``
    (the run's training log). Runs from before attempts.jsonl existed count only completed attempts."""
    from vrpo.train.logging import read_log

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


def measure_representations(spec: StudySpec, folder: Path) -> dict:
    """RA / CKNNA of the EMA weights on held-out in-domain images and, with ``transfer``, on an
    out-of-domain set (RA retention = transfer RA / in-domain RA); kept in representations.json."""
    from vrpo.eval.suite import evaluate_representations

    path = folder / "representations.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    opts = spec.representations
    kwargs = dict(metrics=opts.get("metrics", ["ra", "cknna"]), num=int(opts.get("num", 500)),
                  timesteps=tuple(opts.get("timesteps", [0.5])))
    domains = {"in_domain": None, **({"transfer": opts["transfer"]} if opts.get("transfer") else {})}
    for key, dataset in domains.items():
        if key not in result:
            result[key] = evaluate_representations(folder, dataset=dataset, **kwargs)
            path.write_text(json.dumps(result, indent=1))
    return result


def missing_curve_steps(spec: StudySpec, folder: Path) -> list[int]:
    evaluated = read_metrics(folder) if (folder / "metrics.jsonl").is_file() else {}
    return [s for s in spec.curve_steps if s not in evaluated]


def evaluate_curve_steps(cfg, folder: Path, steps: list[int]) -> None:
    """The training-time evaluation (eval.metrics, eval.num_samples, the same sampling noise) of the
    kept checkpoints of ``steps``, appended to metrics.jsonl: a denser curve without retraining.
    Held-out RA is the training loop's and is not added here."""
    from vrpo.eval.suite import describe_record, evaluate_during_training, run_reference
    from vrpo.sample import load_run_model

    e, extractors = cfg.eval, {}
    for step in steps:
        _, model, _ = load_run_model(folder, step=step)
        record = evaluate_during_training(folder, model, cfg, step, e.num_samples, run_reference(cfg), metrics=e.metrics,
                                          seed=e.seed, ref_num=e.ref_num, cache_dir=e.cache_dir, extractors=extractors)
        print(describe_record(record))


def final_suffix(num_samples: int) -> str:
    return f"_{num_samples // 1000}k" if num_samples % 1000 == 0 else f"_{num_samples}"


def final_evaluation(spec: StudySpec, cfg, folder: Path) -> dict:
    """Sample metrics of the final EMA weights on ``final.num_samples`` images, kept in final_eval.json
    with keys suffixed by the sample count (fid_5k). Samples are kept in parts: a stop resumes."""
    from vrpo.eval.suite import evaluate_samples, metrics_record, reference_root, run_reference
    from vrpo.sample import sample_run

    path = folder / "final_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    num, e = int(spec.final["num_samples"]), cfg.eval
    samples = sample_run(folder, num, folder / f"final_samples_{num}.npz", seed=e.seed, progress=False)
    ref = run_reference(cfg)
    result = evaluate_samples(samples, ref, spec.final.get("metrics", ["fid"]), ref_num=e.ref_num, cache_dir=e.cache_dir,
                              data_root=reference_root(cfg, ref))
    suffix = final_suffix(num)
    record = {k if k == "step" else k + suffix: v for k, v in metrics_record(cfg.train.max_steps, result).items()
              if isinstance(v, (int, float))}
    path.write_text(json.dumps(record, indent=1))
    return record


def archive_run(folder: Path, archive: Path) -> None:
    """Copy a finished run's small outputs to the archive (timing last: it marks the copy complete)."""
    archive.mkdir(parents=True, exist_ok=True)
    for name in sorted(ARCHIVED, key=lambda n: n == "timing.jsonl"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, archive / name)


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
        derived = {"transfer_ra": rep_out.get("ra"), "transfer_cknna": rep_out.get("cknna"),
                   "ra_retention": 100.0 * rep_out["ra"] / rep_in["ra"] if retained else None}
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


def read_run(folder: Path, batch_size: int) -> RunRecord:
    from vrpo.train.logging import read_log

    log = read_log(folder / "log.jsonl")
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
    )


def collect(spec: StudySpec) -> dict[str, dict[int, RunRecord]]:
    """method -> seed -> run record."""
    out: dict[str, dict[int, RunRecord]] = {}
    for m in spec.methods:
        batch = method_config(spec, m, spec.seeds[0]).train.batch_size
        out[m] = {s: read_run(source_dir(spec, m, s), batch) for s in spec.seeds}
    return out


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step where a lower-is-better curve reaches ``target`` (linear between evaluations)."""
    prev = None
    for step, value in curve:
        if value <= target:
            if prev is None:
                return float(step)
            (s0, v0) = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - value) if v0 != value else float(step)
        prev = (step, value)
    return None


def _fmt(mean: float, half: float, n: int, fmt: str = ".2f") -> str:
    if n == 0:
        return "-"
    return f"{mean:{fmt}} +- {half:{fmt}} (n={n})" if n > 1 else f"{mean:{fmt}} (n=1)"


def _number_format(key: str) -> str:
    """Format spec of a metric's values: variances span decades, so they get significant digits."""
    if key.startswith("var:"):
        return ".2e"
    return ".4f" if key.startswith(("ra", "cknna", "transfer")) and key != "ra_retention" else ".2f"


HIGHER_IS_BETTER = ("ra", "cknna", "probe", "transfer_", "ra_retention")


def _interval(mean: float, half: float, fmt: str, prefix: str = "") -> str:
    """[low, high] of a 95 % interval; "-" where one seed gives none."""
    if math.isnan(half):
        return "-"
    sign = "" if prefix else "+"
    return f"[{prefix}{mean - half:{sign}{fmt}}, {prefix}{mean + half:{sign}{fmt}}]"


def verdict(key: str, mean: float, half: float, n: int) -> str:
    """Whether a paired difference is resolved by its 95 % interval, and in which direction."""
    if n < 2 or not abs(mean) > half:
        return "not resolved"
    better = (mean > 0) == key.startswith(HIGHER_IS_BETTER)
    return "better" if better else "worse"


def paired(data, spec: StudySpec, method: str, key: str, step: int | None = None, reference: str | None = None) -> list[float]:
    """Per-seed differences method - reference (default: the baseline) where both have the value."""
    out = []
    for s in spec.seeds:
        a, b = data[method][s].value(key, step), data[reference or spec.baseline][s].value(key, step)
        if a is not None and b is not None:
            out.append(a - b)
    return out


def final_table(spec: StudySpec, data) -> list[str]:
    keys = spec.report_metrics
    if spec.representations:
        keys += [k for k in ("ra", "cknna") if k not in keys]
        if spec.representations.get("transfer"):
            keys += ["transfer_ra", "ra_retention"]
    lines = ["| method | " + " | ".join(keys) + " | s/step | training h |", "| --- |" + " --- |" * (len(keys) + 2)]
    for m, runs in data.items():
        cells = []
        for k in keys:
            vals = [v for r in runs.values() if (v := r.value(k)) is not None]
            cells.append(_fmt(*mean_ci(vals), len(vals), _number_format(k)))
        sps = [r.seconds_per_step for r in runs.values() if r.seconds_per_step]
        cells.append(_fmt(*mean_ci(sps), len(sps), ".3f"))
        cells.append(f"{sum(r.wall_s for r in runs.values()) / 3600:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired differences at the final evaluation, method - reference (negative = lower than the reference; "
              "for RA, CKNNA and retention higher is better); the interval is the 95 % Student-t interval over seeds"
              + (f"; retention is left out where the in-domain RA is below {RETENTION_MIN_RA}"
                 if spec.representations.get("transfer") else "") + ":", "",
              "| method | reference | metric | mean difference | 95 % interval | seeds | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, ref in spec.pairs:
        for k in keys:
            diffs = paired(data, spec, m, k, reference=ref)
            if diffs:
                mean, half = mean_ci(diffs)
                f = _number_format(k)
                lines.append(f"| {m} | {ref} | {k} | {mean:+{f}} | {_interval(mean, half, f)} | {len(diffs)} | {verdict(k, mean, half, len(diffs))} |")
        ratios = [data[m][s].seconds_per_step / data[ref][s].seconds_per_step for s in spec.seeds
                  if data[m][s].seconds_per_step and data[ref][s].seconds_per_step]
        if ratios:  # a ratio, not a difference
            mean, half = mean_ci(ratios)
            lines.append(f"| {m} | {ref} | s/step ratio | x{mean:.3f} | {_interval(mean, half, '.3f', 'x')} | {len(ratios)} | - |")
    return lines


def speedup_lines(spec: StudySpec, data) -> list[str]:
    """Steps each method needs to reach the reference method's final value, as a ratio per seed."""
    if not spec.speedup:
        return []
    ref, key = spec.speedup["reference"], spec.speedup.get("metric", spec.metric)
    lines = [f"## Speed-up against {ref}'s final {key}", "",
             f"Per seed: the step at which a method's {key} curve first reaches {ref}'s final value of that seed "
             "(linear between evaluations); speed-up = final step / that step. 'not reached' runs are counted, not averaged.", "",
             "| method | speed-up (mean +- 95 %) | seeds reached | per seed |", "| --- | --- | --- | --- |"]
    for m in (m for m in spec.methods if m != ref):
        ratios, per_seed = [], []
        for s in spec.seeds:
            target_curve, curve = data[ref][s].curve(key), data[m][s].curve(key)
            if not target_curve or not curve:
                continue
            final_step, target = target_curve[-1]
            reached = steps_to_reach(curve, target)
            per_seed.append(f"{s}: " + (f"x{final_step / reached:.2f}" if reached else "not reached"))
            if reached:
                ratios.append(final_step / reached)
        if per_seed:
            cell = _fmt(*mean_ci(ratios), len(ratios)) if ratios else "-"
            lines.append(f"| {m} | {cell} | {len(ratios)}/{len(per_seed)} | {'; '.join(per_seed)} |")
    return lines + [""]


def measured_steps(data, key: str) -> list[int]:
    """The steps at which any run of the study has ``key``."""
    return sorted({st for runs in data.values() for r in runs.values() for st, _ in r.curve(key)})


def write_report(spec: StudySpec) -> Path:
    data = collect(spec)
    report = Path(spec.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    hours = sum(r.wall_s for runs in data.values() for r in runs.values()) / 3600
    head = [f"# Study {spec.name}", "",
            f"Base config `{spec.base}`, overrides `{' '.join(spec.set)}`; seeds {spec.seeds} (paired); "
            f"training wall time of the runs so far: {hours:.2f} h.", "",
            "## Final evaluation (mean +- 95 % interval over seeds; n = seeds measured)", ""]
    summary = final_table(spec, data)
    lines = head + summary + [""] + speedup_lines(spec, data)
    for key in spec.report_metrics:
        steps = measured_steps(data, key)
        if len(steps) < 2:  # a single point (a final-only metric) is already in the final table
            continue
        lines += [f"## {key} against steps", "", "| step | " + " | ".join(spec.methods) + " | "
                  + " | ".join(f"{m} - {ref}" for m, ref in spec.pairs) + " |",
                  "| --- |" + " --- |" * (len(spec.methods) + len(spec.pairs))]
        for st in steps:
            cells = []
            for m in spec.methods:
                vals = [v for r in data[m].values() if (v := r.value(key, st)) is not None]
                cells.append(_fmt(*mean_ci(vals), len(vals), _number_format(key)))
            for m, ref in spec.pairs:
                diffs, f = paired(data, spec, m, key, st, reference=ref), _number_format(key)
                if not diffs:
                    cells.append("-")
                    continue
                mean, half = mean_ci(diffs)
                cells.append(f"{mean:+{f}} " + (_interval(mean, half, f) if len(diffs) > 1 else "(n=1)"))
            lines.append(f"| {st} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Per-run files: the archive beside this report (config, metrics.jsonl, log.jsonl, representations.json).",
              "Regenerate with `vrpo study --config STUDY.yaml --report-only`."]
    report.write_text("\n".join(lines) + "\n")
    _plot(spec, data, report.with_suffix(".png"))
    if spec.index:
        update_index(Path(spec.index), spec, summary, report)
    return report


def update_index(index: Path, spec: StudySpec, summary: list[str], report: Path) -> None:
    """Replace (or append) this study's block in the results index; the rest of the file is left as written."""
    begin, end = f"<!-- study:{spec.name} -->", f"<!-- /study:{spec.name} -->"
    try:
        link = report.resolve().relative_to(index.resolve().parent)
    except ValueError:
        link = report
    block = "\n".join([begin, f"### Study `{spec.name}` ([report]({link}))", "", *summary, "", end])
    text = index.read_text() if index.is_file() else "# Results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(text)


def _plot(spec: StudySpec, data, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in spec.report_metrics if len(measured_steps(data, k)) > 1]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(data)}  # one colour per method in every panel
    for ax, key in zip(axes[0], keys):
        for m, runs in data.items():
            steps = sorted({st for r in runs.values() for st, _ in r.curve(key)})
            if not steps:
                continue
            stats = [mean_ci([v for r in runs.values() if (v := r.value(key, st)) is not None]) for st in steps]
            mean = np.array([s[0] for s in stats])
            half = np.nan_to_num(np.array([s[1] for s in stats]))
            ax.plot(steps, mean, marker="o", label=m, color=colors[m])
            ax.fill_between(steps, mean - half, mean + half, alpha=0.2, color=colors[m])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{spec.name} (mean, 95 % interval over seeds {spec.seeds})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
