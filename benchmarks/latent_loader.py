"""The latent loader's speed: batches of random rows from a latent folder, through ``LatentSet``.

Writes a synthetic folder in the layout of ``vrpo prepare-latents`` (random fp16 mean and std
[N, 4, 32, 32], uint8 images [N, 3, 256, 256], as ImageNet-256's), unless ``--root`` names a
real one, then times ``batch_rows`` (row gathers from the memory-mapped shards and the posterior
draw) on step-keyed random batches. The first rounds warm the page cache; the figure is the median
of the rest. Prints one JSON object with the images/s. Example:
    python benchmarks/latent_loader.py --count 4096 --batch 256 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def synthetic_folder(root: Path, count: int, shard_size: int, resolution: int) -> None:
    from safetensors.torch import save_file

    from vrpo.data.latents import FORMAT

    g = torch.Generator().manual_seed(0)
    side, shards = resolution // 8, []
    for number, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        tensors = {
            "mean": torch.randn((n, 4, side, side), generator=g).half(),
            "std": torch.rand((n, 4, side, side), generator=g).half(),
            "images": torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8),
            "labels": torch.randint(0, 1000, (n,), generator=g),
        }
        save_file(tensors, str(root / f"shard-{number:05d}.safetensors"))
        shards.append({"file": f"shard-{number:05d}.safetensors", "count": n})
    manifest = {"format": FORMAT, "vae": "synthetic", "vae_sha256": "", "resolution": resolution,
                "scaling_factor": 0.18215, "count": count, "classes": [str(i) for i in range(1000)],
                "shards": shards}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="a real latent folder (default: a synthetic one)")
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    from vrpo.data import batch_indices, step_generator
    from vrpo.data.latents import LatentSet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not args.root:
            synthetic_folder(root, args.count, args.shard_size, args.resolution)
        data = LatentSet(root)
        seconds = []
        for step in range(args.warmup + args.rounds):
            index = batch_indices(step, args.batch, len(data), 0)
            start = time.perf_counter()
            data.batch_rows(index, step_generator(0, step, 0))
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds[args.warmup :])
        print(json.dumps({"root": args.root or "synthetic", "count": len(data), "batch": args.batch,
                          "threads": torch.get_num_threads(), "ms_per_batch": round(1000 * median, 1),
                          "images_per_s": round(args.batch / median, 1)}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
