"""Train-step cost of a config: prints one JSON object (ms_per_step, images_per_s, peak_rss_mb).

Runs the real loop's step (``Trainer.train_one_step``) on the configured data, after a few
warm-up steps, in a throwaway run folder. Example:
    python benchmarks/train_step.py --config configs/fmnist/sit-t2.yaml --set model.arch=SiT-S/2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import torch


def measure(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    from vrpo.config import load_config
    from vrpo.train.loop import Trainer

    cfg = load_config(
        config, [*overrides, "train.progress=false", "train.tensorboard=false", f"train.max_steps={steps + warmup}"]
    )
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(cfg, run)
        for _ in range(warmup):
            trainer.train_one_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_one_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {
        "config": config,
        "overrides": overrides,
        "arch": cfg.model.arch,
        "objective": cfg.objective.name,
        "batch_size": cfg.train.batch_size,
        "resolution": cfg.data.resolution,
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "ms_per_step": 1000 * elapsed / steps,
        "images_per_s": steps * cfg.train.batch_size / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_interleaved(variants: dict[str, tuple[str, list[str]]], steps: int, warmup: int) -> dict[str, dict]:
    """Time several configs step by step in turn (round robin), so that drift in the
    machine's speed hits every variant alike; reports the median and mean step time."""
    import statistics

    from vrpo.config import load_config
    from vrpo.train.loop import Trainer

    trainers, batch = {}, {}
    with tempfile.TemporaryDirectory() as root:
        for i, (name, (config, overrides)) in enumerate(variants.items()):
            cfg = load_config(
                config,
                [*overrides, "train.progress=false", "train.tensorboard=false", f"train.max_steps={steps + warmup}"],
            )
            trainers[name] = Trainer(cfg, f"{root}/{i}")
            batch[name] = cfg.train.batch_size
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for round_ in range(warmup + steps):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_one_step()
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {
        name: {
            "ms_per_step_median": 1000 * statistics.median(t),
            "ms_per_step_mean": 1000 * statistics.fmean(t),
            "images_per_s": batch[name] / statistics.median(t),
            "steps": len(t),
            "ms_per_step": [round(1000 * x, 2) for x in t],  # in round order: pairs with the other variants
        }
        for name, t in times.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.config, args.set, args.steps, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
