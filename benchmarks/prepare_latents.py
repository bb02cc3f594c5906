"""Preprocessing speed: ``vrpo prepare-latents`` on ImageNet-like JPEGs through the SD-VAE's architecture.

The real ``stabilityai/sd-vae-ft-ema`` cannot be fetched here, so the VAE is its architecture
(diffusers' ``AutoencoderKL`` with the published config: 4 levels of 128-256-512-512 channels,
2 layers per block, 4 latent channels) with random weights: the same computation, so the same
time. The images are random JPEGs of ImageNet's typical size (500 x 375), 10 per class folder.
Times the whole command (reading, ADM crop, encoding, shard writing) after one warm-up batch.
Prints one JSON object. Example:
    python benchmarks/prepare_latents.py --count 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)  # fmt: skip


def jpeg_folder(root: Path, count: int, per_class: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"n{i // per_class:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth random images: JPEG-compressible like photographs, not noise
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"{i:05d}.JPEG", quality=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL

    from vrpo.data.latents import prepare_latents

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE).save_pretrained(tmp / "vae")
        jpeg_folder(tmp / "warm", args.batch_size)
        jpeg_folder(tmp / "images", args.count)
        common = dict(vae=str(tmp / "vae"), resolution=args.resolution, shard_size=args.count,
                      batch_size=args.batch_size, workers=args.workers, progress=False)  # fmt: skip
        prepare_latents(tmp / "warm", tmp / "warm-out", **common)
        start = time.perf_counter()
        manifest = prepare_latents(tmp / "images", tmp / "out", **common)
        seconds = time.perf_counter() - start
    print(json.dumps({"vae": "sd-vae architecture (random weights)", "images": manifest["count"],
                      "resolution": args.resolution, "batch_size": args.batch_size, "workers": args.workers,
                      "threads": torch.get_num_threads(), "device": "cpu", "seconds": round(seconds, 1),
                      "images_per_s": round(manifest["count"] / seconds, 2)}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
