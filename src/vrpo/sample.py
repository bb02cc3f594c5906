"""Sampling a trained run into an ADM-style npz (arr_0: uint8 N x H x W x C, arr_1: labels).

Samples are class-balanced (label i mod num_classes) and batch b draws its noise from a
generator seeded by (seed, b), so a run of N samples is the same whatever the batch size
order of completion; finished batches are kept in ``OUT.parts/`` and a killed job resumes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from vrpo.config import config_from_dict
from vrpo.models import build_model
from vrpo.train.checkpoint import load_weights
from vrpo.transport import generate
from vrpo.utils.images import save_grid, to_uint8


def load_run_model(run_dir: str | Path, which: str = "ema", device: str = "cpu", step: int | None = None):
    """(config, model with the run's newest good weights, or those of ``step``, step) for a run folder."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load(path.read_text()))
    weights, step = load_weights(run_dir, which, step)
    has_labels = "y_embedder.table.weight" in weights
    num_classes = weights["y_embedder.table.weight"].shape[0] - 1 if has_labels else 0
    channels = weights["patch_embed.weight"].shape[1]
    model = build_model(cfg.model.arch, cfg.data.resolution, channels, num_classes, mlp_ratio=cfg.model.mlp_ratio, qk_norm=cfg.model.qk_norm)
    model.load_state_dict(weights)
    return cfg, model.to(device).eval(), step


def sample_run(
    run_dir: str | Path,
    num: int,
    out: str | Path,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    **sampler_overrides,
) -> Path:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, model, step = load_run_model(run_dir, device=device)
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    conditional = model.num_classes > 0
    c, r = model.in_channels, model.input_size
    batches = range(0, num, batch_size)
    from tqdm.auto import tqdm

    for start in tqdm(batches, disable=not progress, desc=f"sample (step {step})"):
        part = parts / f"{start:08d}.npz"
        if part.exists():
            continue
        n = min(batch_size, num - start)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        noise = torch.randn((n, c, r, r), generator=gen).to(device)
        labels = torch.arange(start, start + n) % model.num_classes if conditional else torch.zeros(n, dtype=torch.long)
        with torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False):
            x = generate(model, cfg, labels.to(device) if conditional else None, noise, gen, **sampler_overrides)
        tmp = part.with_suffix(".tmp.npz")
        np.savez(tmp, images=to_uint8(x).cpu().numpy(), labels=labels.numpy())
        tmp.rename(part)
    images, labels = [], []
    for start in batches:
        with np.load(parts / f"{start:08d}.npz") as f:
            images.append(f["images"])
            labels.append(f["labels"])
    images_nchw = np.concatenate(images)
    np.savez(out, arr_0=images_nchw.transpose(0, 2, 3, 1), arr_1=np.concatenate(labels))
    save_grid(torch.from_numpy(images_nchw[:100]), out.with_suffix(".png"), nrow=10)
    shutil.rmtree(parts)
    return out
