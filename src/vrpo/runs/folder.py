"""Reading a run folder: its config, its model at a checkpoint, its evaluated steps.

Every command that reads a finished or running run (``vrpo sample``, ``vrpo eval``, the study,
a resumed training) goes through here, so a run folder has one reader.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vrpo.config import Config, config_from_dict
from vrpo.errors import ConfigError
from vrpo.models import build_model
from vrpo.objectives import objective_options
from vrpo.runs.checkpoint import load_weights, step_dirs
from vrpo.utils.jsonl import read_log


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(tree).__name__}")
    section = tree.get("objective") or {"name": "sit"}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: its objective section must be a mapping, got {section!r}")
    tree["objective"] = objective_options(section.get("name", "sit")).from_saved(section)
    sampler = tree.get("sampler")
    if isinstance(sampler, dict) and "noise_keying" not in sampler:  # written before per-sample keying
        sampler["noise_keying"] = "batch"
    optim = tree.get("optim")
    if isinstance(optim, dict) and "fused" not in optim:  # written before the fused AdamW: torch's default path
        optim["fused"] = False
    return config_from_dict(tree)


def load_run_model(run_dir: str | Path, which: str = "ema", device: str = "cpu", step: int | None = None):
    """(config, model with the run's newest good weights, or those of ``step``, step) for a run folder."""
    cfg = load_run_config(run_dir)
    weights, step = load_weights(Path(run_dir), which, step)
    has_labels = "y_embedder.table.weight" in weights
    num_classes = weights["y_embedder.table.weight"].shape[0] - 1 if has_labels else 0
    channels = weights["patch_embed.weight"].shape[1] - cfg.model.representation_channels  # the image's
    model = build_model(
        cfg.model.arch,
        cfg.data.resolution,
        channels,
        num_classes,
        **cfg.model.build_options(),
    )
    model.load_state_dict(weights)
    return cfg, model.to(device).eval(), step


def newest_checkpoint_step(run_dir: str | Path) -> int | None:
    found = step_dirs(Path(run_dir))
    return int(found[0].name[5:]) if found else None


def read_metrics(run_dir: str | Path) -> dict[int, dict]:
    """step -> the evaluation record of that step (RUN/metrics.jsonl)."""
    return {int(r["step"]): r for r in read_log(Path(run_dir) / "metrics.jsonl")}


def run_summary(run_dir: str | Path) -> list[str]:
    """A few lines on a run: its last logged losses and VRPO weights, its newest evaluations, its
    warnings and where its pictures are."""
    run_dir = Path(run_dir)
    log = read_log(run_dir / "log.jsonl")
    if not log:
        raise FileNotFoundError(f"{run_dir} has no log.jsonl: is it a run folder?")
    last = log[-1]
    lines = [f"{run_dir}: step {last['step']}, loss {last['loss']:.4f}"]
    weights = {k[2:]: v for k, v in last.items() if k.startswith("w_")}
    if weights:
        coef = {k: f" (coef {last['coef_' + k]:.3f})" if "coef_" + k in last else "" for k in weights}
        parts = ", ".join(f"{k} {v:.2f}{coef[k]}" for k, v in weights.items())
        lines.append(f"  reward weights: {parts}; lambda_s {last['lambda_s']:.3f}")
    merged: dict = {}
    for record in read_log(run_dir / "metrics.jsonl"):
        merged.update({k: v for k, v in record.items() if isinstance(v, float)})
    shown = [k for k in ("ra", "cknna", "probe", "fid", "fd_efficientnet") if k in merged]
    if shown:
        lines.append("  metrics: " + ", ".join(f"{k} {merged[k]:.4g}" for k in shown))
    warned = sorted({r["key"] for r in read_log(run_dir / "warnings.jsonl") if "key" in r})
    lines.append(f"  warnings: {', '.join(warned) if warned else 'none'}")
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    pictures = [*grids[-1:], *(p for p in map(run_dir.joinpath, ("samples.png", "loss_curve.png", "vrpo_weights.png")))]
    lines.append("  pictures: " + ", ".join(str(p) for p in pictures if p.is_file()))
    return lines
