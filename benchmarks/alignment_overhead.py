"""Step-time overhead of alignment methods over SiT, measured in one process on one config.

For each objective (SiT, then the alignment ones with a feature cache and on the fly, then
any --variant) it times the real training step, all variants in turn step by step so that
the machine's drift hits them alike, and prints one JSON object with median ratios.
The cache is built first (on a small subset) into a temporary folder, and its build time
and size are reported too. Example:
    python benchmarks/alignment_overhead.py --arch SiT-T/2 --objectives repa
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_step import measure_interleaved  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fmnist/repa-t2.yaml")
    parser.add_argument("--arch", default="SiT-T/2")
    parser.add_argument("--objectives", default="repa", help="comma-separated alignment objectives")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE;KEY=VALUE",
        help="an extra cached run, e.g. 'vrpo-sem:objective.name=vrpo;objective.rewards=[semantic]'",
    )
    parser.add_argument("--no-on-the-fly", action="store_true", help="time only the cached runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--limit", type=int, default=640, help="images in the cached subset")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--reference", default=None, help="a variant to divide by round by round (e.g. repa): paired ratios, 95%% CI"
    )
    args = parser.parse_args(argv)

    from vrpo.config import load_config
    from vrpo.data import load_dataset
    from vrpo.encoders.cache import build_feature_caches

    base = [f"model.arch={args.arch}", f"data.limit={args.limit}", *args.set]
    with tempfile.TemporaryDirectory() as cache_root:
        cfg = load_config(args.config, [*base, f"objective.feature_cache={cache_root}"])
        encoders = cfg.objective.build_encoders(cfg.data.resolution)
        built = build_feature_caches(encoders, cache_root, lambda: load_dataset(cfg.data), progress=False)
        cache = {b["encoder"]: {"images": b["images"], "build_s": b["build_s"], "mib": b["mib"]} for b in built}
        cached = f"objective.feature_cache={cache_root}"
        variants = {"sit": (args.config, [*base, "objective={name: sit}"])}
        for name in filter(None, args.objectives.split(",")):
            obj = [*base, f"objective.name={name}"]
            variants[f"{name}_cache"] = (args.config, [*obj, cached])
            if not args.no_on_the_fly:
                variants[f"{name}_on_the_fly"] = (args.config, [*obj, "objective.feature_cache=null"])
        for variant in args.variant:
            name, _, overrides = variant.partition(":")
            settings = [*base, *overrides.split(";")]
            uses_encoders = bool(load_config(args.config, settings).objective.encoder_names())
            variants[name] = (args.config, [*settings, cached] if uses_encoders else settings)  # SiT-only methods
        if args.reference and args.reference not in variants:
            raise SystemExit(f"--reference {args.reference!r} is not one of the variants {list(variants)}")
        runs = measure_interleaved(variants, args.steps, args.warmup)
    sit_ms = runs["sit"]["ms_per_step_median"]
    paired = {}
    if args.reference:
        paired = {k: paired_ratio(v["ms_per_step"], runs[args.reference]["ms_per_step"]) for k, v in runs.items()}
    print(
        json.dumps(
            {
                **({"paired_ratio_over_" + args.reference: paired} if paired else {}),
                "arch": args.arch,
                "config": args.config,
                "steps_per_variant": args.steps,
                "ms_per_step_median": {k: round(v["ms_per_step_median"], 1) for k, v in runs.items()},
                "ratio_over_sit": {k: round(v["ms_per_step_median"] / sit_ms, 3) for k, v in runs.items()},
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "cache": cache,
            }
        )
    )
    return 0


def paired_ratio(times: list[float], reference: list[float], draws: int = 2000) -> dict:
    """Median of the per-round ratios (the same round of the machine's drift) and its bootstrap 95% CI."""
    ratios = [a / b for a, b in zip(times, reference)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return {
        "median": round(statistics.median(ratios), 4),
        "ci95": [round(medians[int(0.025 * draws)], 4), round(medians[int(0.975 * draws)], 4)],
    }


if __name__ == "__main__":
    sys.exit(main())
