"""Running a study: each (method, seed) run trained or resumed, its representation, final and
curve-point evaluations, its archive, and the report rewritten after every run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vrpo.data import load_dataset, pixel_resolution
from vrpo.encoders.cache import build_feature_caches
from vrpo.errors import ConfigError
from vrpo.eval.representations import evaluate_representations
from vrpo.eval.sample_metrics import evaluate_samples, metrics_record
from vrpo.eval.training import evaluate_configured, reference_root, run_reference
from vrpo.runs import latest_checkpoint, load_run_model, read_metrics, step_dir
from vrpo.sample import sample_run
from vrpo.study.report import write_report
from vrpo.study.spec import (
    ARCHIVED,
    StudySpec,
    archive_dir,
    archived_final_step,
    archived_twin,
    method_config,
    run_dir,
)
from vrpo.train import train
from vrpo.utils.jsonl import append_record
from vrpo.utils.machine import machine_id


def ensure_feature_cache(cfg) -> None:
    """Build the method's feature cache when the config names one that is missing or incomplete."""
    root = cfg.objective.cache_root()
    if root:
        encoders = cfg.objective.build_encoders(pixel_resolution(cfg.data))
        build_feature_caches(encoders, root, lambda: load_dataset(cfg.data), skip_complete=True)


def run_study(spec: StudySpec, log=print, only_seeds=None, only_methods=None) -> Path:
    if only_seeds is not None and set(only_seeds) - set(spec.seeds):
        raise ConfigError(f"--seeds {sorted(set(only_seeds) - set(spec.seeds))} not in the study's seeds {spec.seeds}")
    if only_methods is not None and set(only_methods) - set(spec.methods):
        raise ConfigError(
            f"--methods {sorted(set(only_methods) - set(spec.methods))} not in the study's methods {list(spec.methods)}"
        )
    for seed in spec.seeds:  # seed-major: a partial study already holds complete pairs
        if only_seeds is not None and seed not in only_seeds:
            continue
        for method in spec.methods:
            if (only_methods is not None and method not in only_methods) or method in spec.imported:
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
                    log(
                        f"[study {spec.name}] {method} seed {seed}: curve steps {missing} not evaluated, "
                        f"their checkpoints are no longer in {folder} (the study does not retrain for them)"
                    )
                    continue
            else:
                done = latest_checkpoint(folder) if folder.exists() else None
                if done is None or done.step < cfg.train.max_steps or not (folder / "timing.jsonl").is_file():
                    if archived_final_step(archive) == cfg.train.max_steps:  # trained once, weights gone
                        log(
                            f"[study {spec.name}] {method} seed {seed}: trained, but its final weights are no longer "
                            f"in {folder}; retraining (deterministic) for the representation or final evaluation"
                        )
                    log(f"[study {spec.name}] {method} seed {seed} -> {folder}")
                    ensure_feature_cache(cfg)
                    start = time.time()
                    # a killed attempt still counts; the machine keeps step times of different machines apart
                    append_record(folder / "attempts.jsonl", {"start": start, "machine": machine_id()})
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


def measure_representations(spec: StudySpec, folder: Path) -> dict:
    """RA / CKNNA of the EMA weights on held-out in-domain images and, with ``transfer``, on an
    out-of-domain set (RA retention = transfer RA / in-domain RA); kept in representations.json."""
    path = folder / "representations.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    opts = spec.representations
    kwargs = dict(
        metrics=opts.get("metrics", ["ra", "cknna"]),
        num=int(opts.get("num", 500)),
        timesteps=tuple(opts.get("timesteps", [0.5])),
    )
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
    e, extractors = cfg.eval, {}
    for step in steps:
        _, model, _ = load_run_model(folder, step=step)
        evaluate_configured(folder, model, cfg, step, e.num_samples, e.metrics, extractors)


def final_suffix(num_samples: int) -> str:
    return f"_{num_samples // 1000}k" if num_samples % 1000 == 0 else f"_{num_samples}"


def final_evaluation(spec: StudySpec, cfg, folder: Path) -> dict:
    """Sample metrics of the final EMA weights on ``final.num_samples`` images, kept in final_eval.json
    with keys suffixed by the sample count (fid_5k). Samples are kept in parts: a stop resumes."""
    path = folder / "final_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    num, e = int(spec.final["num_samples"]), cfg.eval
    samples = sample_run(
        folder, num, folder / f"final_samples_{num}.npz", batch_size=e.batch_size, seed=e.seed, progress=False
    )
    ref = run_reference(cfg)
    result = evaluate_samples(
        samples,
        ref,
        spec.final.get("metrics", ["fid"]),
        ref_num=e.ref_num,
        cache_dir=e.cache_dir,
        data_root=reference_root(cfg, ref),
    )
    suffix = final_suffix(num)
    record = {
        k if k == "step" else k + suffix: v
        for k, v in metrics_record(cfg.train.max_steps, result).items()
        if isinstance(v, (int, float))
    }
    path.write_text(json.dumps(record, indent=1))
    return record


def archive_run(folder: Path, archive: Path) -> None:
    """Copy a finished run's small outputs to the archive (timing last: it marks the copy complete)."""
    archive.mkdir(parents=True, exist_ok=True)
    for name in sorted(ARCHIVED, key=lambda n: n == "timing.jsonl"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, archive / name)
