"""Training-step and sampling throughput of the large SiT configs on one device; prints JSON.

For each architecture (default SiT-B/2 and SiT-XL/2 on ImageNet-256 latents: 4 x 32 x 32,
1000 classes, random latents written to a temporary shard folder) and each precision/compile
variant, the real loop's step (``Trainer.train_one_step``) is timed after warm-up steps (which
include the compile), with the device's peak memory. Then the sampler's images/s with the
architecture's random EMA weights at each ``--sample-batches`` size. Each measurement is written
to ``--out`` (JSON lines) as soon as it is taken, so a call stopped by its time limit keeps what
it measured.

    python benchmarks/gpu_throughput.py --out throughput.jsonl                  # a GPU
    python benchmarks/gpu_throughput.py --archs SiT-T/8 --batch 8 --resolution 8 --steps 2 \\
        --sample-batches 4,8 --sample-num 8 --sampler-steps 2 --out /tmp/t.jsonl  # a CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from train_step import measure  # noqa: E402

VARIANTS = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "bf16-compile": ["train.precision=bf16", "train.compile=true"],
}


def random_latents(folder: Path, rows: int, channels: int, resolution: int, classes: int) -> Path:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, channels, resolution, resolution, generator=g)
    save_file({"images": latents, "labels": torch.arange(rows) % classes}, str(folder / "shard-0.safetensors"))
    return folder


def sampling_rate(arch: str, sets: list[str], batch: int, num: int) -> dict:
    """Images/s of ``num`` samples at ``batch`` with random weights of ``arch`` (bf16 autocast on CUDA)."""
    from vrpo.config import load_config
    from vrpo.models import build_model
    from vrpo.sample import sample_batch

    cfg = load_config(None, sets)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(arch, cfg.data.resolution, 4, 1000).to(device).eval()
    sample_batch(model, cfg, 0, min(batch, num))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, num, batch):
        sample_batch(model, cfg, first, min(batch, num - first))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"batch": batch, "num": num, "seconds": round(seconds, 2), "images_per_s": round(num / seconds, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="SiT-B/2,SiT-XL/2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=256, help="global batch (REPA's)")
    parser.add_argument("--resolution", type=int, default=32, help="latent side (256 px / 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample-batches", default="64,512")
    parser.add_argument("--sample-num", type=int, default=1024)
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per measurement")
    args = parser.parse_args(argv)

    def record(entry: dict) -> None:
        with args.out.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    with tempfile.TemporaryDirectory() as root:
        data = random_latents(Path(root), max(2 * args.batch, 64), 4, args.resolution, 1000)
        for arch in args.archs.split(","):
            sets = ["data.name=tensors", f"data.root={data}", f"data.resolution={args.resolution}", "data.limit=0",
                    f"model.arch={arch}", "objective.name=sit", f"train.batch_size={args.batch}",
                    "train.sample_grid=0", "train.ckpt_every=100000", "eval.every=0",
                    f"sampler.steps={args.sampler_steps}"]  # fmt: skip
            for name in args.variants.split(","):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                try:
                    result = measure(None, [*sets, *VARIANTS[name]], args.steps, args.warmup)
                except torch.OutOfMemoryError as err:
                    record({"arch": arch, "variant": name, "error": f"out of memory: {str(err).splitlines()[0]}"})
                    continue
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                record({"kind": "train", "arch": arch, "variant": name, "device": device, "batch": args.batch,
                        "ms_per_step": round(result["ms_per_step"], 1),
                        "images_per_s": round(result["images_per_s"], 1),
                        "peak_gib": None if peak is None else round(peak, 2),
                        "seconds_with_warmup": round(time.perf_counter() - start, 1)})  # fmt: skip
            for batch in (int(b) for b in args.sample_batches.split(",")):
                rate = sampling_rate(arch, sets, batch, args.sample_num)
                record({"kind": "sample", "arch": arch, "device": device, "sampler_steps": args.sampler_steps, **rate})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
