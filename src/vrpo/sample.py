"""The one sample generator: in memory for evaluations, and into an ADM-style npz for ``vrpo sample``.

Samples are class-balanced (label i mod num_classes) and sample i draws all its noise from a
generator keyed on (seed, i) (``sampler.noise_keying: sample``), so N samples are the same for any
batch size, world size and order of completion; ``sample_run`` keeps finished batches in
``OUT.parts-b{batch}-s{seed}-{keying}/`` and a killed job resumes.
The npz holds arr_0 (uint8 N x H x W x C) and arr_1 (labels).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vrpo.config import with_sampler
from vrpo.data.latents import latent_decoder
from vrpo.errors import EvalError
from vrpo.runs import load_run_model
from vrpo.transport import generate
from vrpo.utils.dist import barrier, gather_mapping, init_distributed, is_main, rank_and_world
from vrpo.utils.files import replacing
from vrpo.utils.images import save_grid, to_uint8
from vrpo.utils.randomness import normal, sampling_noise


@torch.no_grad()
def sample_batch(
    model, cfg, start: int, n: int, seed: int = 0, **sampler_overrides
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples start..start+n-1 as uint8 [n, C, H, W] on the CPU, with their labels (zeros when unconditional)."""
    device = next(model.parameters()).device
    keying = sampler_overrides.get("noise_keying") or cfg.sampler.noise_keying
    generator = sampling_noise(seed, start, n, keying)
    noise = normal((n, model.in_channels, model.input_size, model.input_size), generator, device)
    conditional = model.num_classes > 0
    labels = torch.arange(start, start + n) % model.num_classes if conditional else torch.zeros(n, dtype=torch.long)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        x = generate(model, cfg, labels.to(device) if conditional else None, noise, generator, **sampler_overrides)
    decode = latent_decoder(cfg, device)  # a latent run's samples through its VAE
    return to_uint8(x if decode is None else decode(x)).cpu(), labels


def rank_batches(num: int, batch_size: int) -> range:
    """The first indices of this rank's batches: every world-size-th batch of ``num`` samples."""
    rank, world = rank_and_world()
    return range(rank * batch_size, num, world * batch_size)


@torch.no_grad()
def generate_images(
    model, cfg, num: int, seed: int = 0, batch_size: int = 64, gather: bool = True, **sampler_overrides
) -> torch.Tensor | None:
    """``num`` class-balanced uint8 samples [N, C, H, W], the same as ``vrpo sample`` writes for this seed.
    Under torchrun every rank samples its share of the batches; rank 0 gets them all, the others None.
    ``gather=False``: every rank keeps its own share (its batches in order; possibly none)."""
    was_training = model.training
    model.eval()
    mine = {
        start: sample_batch(model, cfg, start, min(batch_size, num - start), seed, **sampler_overrides)[0]
        for start in rank_batches(num, batch_size)
    }
    model.train(was_training)
    if not gather:  # a rank without batches: no images (their size is checked on rank 0, never empty)
        return torch.cat(list(mine.values())) if mine else torch.empty((0, 1, 1, 1), dtype=torch.uint8)
    batches = gather_mapping(mine)
    return None if batches is None else torch.cat([batches[start] for start in range(0, num, batch_size)])


def sample_run(
    run_dir: str | Path,
    num: int,
    out: str | Path,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    dist_timeout_s: float = 86400.0,
    **sampler_overrides,
) -> Path:
    """``num`` samples of a run into an npz at ``out``; under torchrun each rank samples its share.
    The final barrier waits up to ``dist_timeout_s``: a resumed rank with fewer parts left waits
    for the others, possibly for hours."""
    device = init_distributed(device, dist_timeout_s)[2]
    cfg, model, step = load_run_model(run_dir, device=str(device))
    cfg = with_sampler(cfg, **sampler_overrides)  # refused in one line if they cannot sample this run
    sampler_overrides = {}
    out = Path(out)
    # a part is batch `start` of this batch size, seed and keying: another setting gets other parts
    parts = out.with_name(f"{out.name}.parts-b{batch_size}-s{seed}-{cfg.sampler.noise_keying}")
    parts.mkdir(parents=True, exist_ok=True)
    batches = range(0, num, batch_size)
    for start in tqdm(
        rank_batches(num, batch_size), disable=not progress or not is_main(), desc=f"sample (step {step})"
    ):
        part = parts / f"{start:08d}.npz"
        if part.exists():
            continue
        images, labels = sample_batch(model, cfg, start, min(batch_size, num - start), seed, **sampler_overrides)
        with replacing(part) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images.numpy(), labels=labels.numpy())
    barrier()  # every rank's parts are written
    if not is_main():
        return out
    images, labels = [], []
    for start in batches:
        with np.load(parts / f"{start:08d}.npz") as f:
            if len(f["labels"]) != min(batch_size, num - start):
                raise EvalError(f"sample part {parts / f'{start:08d}.npz'} holds {len(f['labels'])} samples, not "
                                f"{min(batch_size, num - start)}: delete {parts} and sample again")  # fmt: skip
            images.append(f["images"])
            labels.append(f["labels"])
    images_nchw = np.concatenate(images)
    np.savez(out, arr_0=images_nchw.transpose(0, 2, 3, 1), arr_1=np.concatenate(labels))
    save_grid(torch.from_numpy(images_nchw[:100]), out.with_suffix(".png"), nrow=10)
    shutil.rmtree(parts)
    return out
