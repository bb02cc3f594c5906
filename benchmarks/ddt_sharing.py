"""DDT's encoder sharing at sampling: images/s and the distance to unshared samples per period k.

Samples one batch per setting (k = 1 and each --every, uniform and optimal), settings in turn
round by round so that the machine's drift hits them alike, from a run folder (its EMA weights)
or, without one, a freshly initialised network of the config. Prints one JSON object: the median
ms per batch, the paired speed-up over k = 1 with its bootstrap 95% interval, the encoder runs,
and the RMS difference of the samples from k = 1's (model space, same noise). Example:
    python benchmarks/ddt_sharing.py --run RUN --every 2,4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from alignment_overhead import paired_ratio  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a trained DDT run folder (default: a fresh network)")
    parser.add_argument("--config", default="configs/fmnist/ddt-t4.yaml")
    parser.add_argument("--every", default="2,4", help="comma-separated sharing periods besides 1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--method", default="heun")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from vrpo.config import load_config
    from vrpo.models import build_model
    from vrpo.runs import load_run_model
    from vrpo.transport import generate

    if args.run:
        cfg, model, step = load_run_model(args.run)
    else:
        cfg, step = load_config(args.config), 0
        torch.manual_seed(0)
        model = build_model(cfg.model.arch, cfg.data.resolution, 1, 10, **cfg.model.build_options()).eval()
    settings = {"k1": dict(encoder_sharing=1)}
    for k in map(int, filter(None, args.every.split(","))):
        settings[f"k{k}"] = dict(encoder_sharing=k, encoder_schedule="uniform")
        settings[f"k{k}_optimal"] = dict(encoder_sharing=k, encoder_schedule="optimal")
    noise = torch.randn(args.batch, model.in_channels, model.input_size, model.input_size,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    labels = torch.arange(args.batch) % model.num_classes
    times = {name: [] for name in settings}
    samples = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, options in settings.items():
                start = time.perf_counter()
                samples[name] = generate(model, cfg, labels, noise, torch.Generator().manual_seed(1),
                                         method=args.method, steps=args.steps, **options)  # fmt: skip
                times[name].append(1000 * (time.perf_counter() - start))
    reference = samples["k1"]
    print(
        json.dumps(
            {
                "run": args.run,
                "step": step,
                "arch": cfg.model.arch,
                "decoder_depth": cfg.model.decoder_depth,
                "batch": args.batch,
                "method": args.method,
                "steps": args.steps,
                "cfg_scale": cfg.sampler.cfg_scale,
                "rounds": args.rounds,
                "ms_per_batch_median": {k: round(statistics.median(v), 1) for k, v in times.items()},
                "speedup_over_k1": {k: paired_ratio(times["k1"], v) for k, v in times.items()},
                "rms_difference_from_k1": {
                    k: round(float((v - reference).pow(2).mean().sqrt()), 4) for k, v in samples.items()
                },
                "rms_of_k1": round(float(reference.pow(2).mean().sqrt()), 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
