"""The ``vrpo`` command: train, sample (and the evaluation commands as they land)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args) -> int:
    from vrpo.config import load_config
    from vrpo.train import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, args.out)
    print(f"done: {result.step} steps ({result.skipped_steps} skipped), last loss {result.last_loss:.4f}")
    print(f"  run folder:  {result.run_dir}")
    print(f"  samples:     {result.samples}")
    print(f"  loss curve:  {result.loss_curve}")
    print(f"  log:         {result.run_dir / 'log.jsonl'} (tensorboard --logdir {result.run_dir / 'tb'})")
    return 0


def _sample(args) -> int:
    from vrpo.sample import sample_run

    out = sample_run(
        args.run, args.num, args.out, batch_size=args.batch_size, seed=args.seed, device=args.device,
        method=args.sampler, steps=args.steps, cfg_scale=args.cfg,
    )
    print(f"wrote {args.num} samples to {out} (grid: {out.with_suffix('.png')})")
    return 0


def _cache_features(args) -> int:
    import time

    from vrpo.config import ConfigError, load_config
    from vrpo.data import load_dataset
    from vrpo.encoders.cache import build_cache, cache_slug
    from vrpo.objectives.alignment import AlignmentOptions, build_alignment_encoders

    cfg = load_config(args.config, args.set)
    options = cfg.objective
    if not isinstance(options, AlignmentOptions):
        raise ConfigError(f"objective '{options.name}' uses no encoder: cache-features needs an alignment method (repa, vrpo)")
    if not options.feature_cache:
        raise ConfigError("objective.feature_cache is not set: name the folder for the cache (--set objective.feature_cache=DIR)")
    data = load_dataset(cfg.data)
    for encoder in build_alignment_encoders(options, cfg.data.resolution):
        folder = Path(options.feature_cache) / cache_slug(encoder)
        start = time.perf_counter()
        build_cache(folder, encoder, data, dtype=args.dtype, shard_size=args.shard_size, batch_size=args.batch_size)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"{encoder.name}: {len(data)} images, grid {encoder.grid_for((cfg.data.resolution,) * 2)}, "
              f"{size:.1f} MiB in {folder} ({time.perf_counter() - start:.0f} s this call)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrpo", description="Diffusion transformers with representation alignment.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/fmnist/sit-t2.yaml")
    p.add_argument("--out", required=True, type=Path, help="run folder; an existing one is resumed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="sample a trained run into an ADM-style npz")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's config)")
    p.add_argument("--sampler", default=None, choices=["euler", "heun", "sde", "ddpm"])
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_sample)
    p = sub.add_parser("cache-features", help="encode the dataset once with the config's frozen encoders")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000)
    p.set_defaults(func=_cache_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vrpo.config import ConfigError
    from vrpo.data import DataError
    from vrpo.train import TrainingDiverged
    from vrpo.encoders.cache import CacheMismatch
    from vrpo.train.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, CacheMismatch, TrainingDiverged, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
