"""The ``vrpo`` command: train, sample, prepare-latents, cache-features, import-checkpoint, eval, plot and study."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vrpo.config import load_config, parse_override
from vrpo.data import DataError, load_dataset, pixel_resolution
from vrpo.encoders.cache import CacheMismatch, build_feature_caches
from vrpo.errors import ConfigError, EvalError, MissingExtra, PeerLost
from vrpo.eval.plot import plot_runs
from vrpo.eval.representations import RUN_METRICS, evaluate_representations
from vrpo.eval.sample_metrics import SAMPLE_METRICS, evaluate_samples, metrics_record
from vrpo.runs import CheckpointError, append_record, newest_checkpoint_step, run_summary
from vrpo.runs.importing import SOURCES, import_checkpoint
from vrpo.sample import sample_run
from vrpo.study import load_study, run_study, write_report
from vrpo.train import TrainingDiverged, train
from vrpo.train.stopping import TrainingStopped
from vrpo.transport.noising import SAMPLERS
from vrpo.utils.dist import close_distributed, init_distributed, is_main, rank_and_world


def _train(args) -> int:
    cfg = load_config(args.config, args.set)
    result = train(cfg, args.out)
    if not is_main():
        return 0
    print(f"done: {result.step} steps ({result.skipped_steps} skipped), last loss {result.last_loss:.4f}")
    print(f"  run folder:  {result.run_dir}")
    print(f"  samples:     {result.samples}")
    print(f"  loss curve:  {result.loss_curve}")
    print(f"  log:         {result.run_dir / 'log.jsonl'} (tensorboard --logdir {result.run_dir / 'tb'})")
    return 0


def _sample(args) -> int:
    out = sample_run(
        args.run,
        args.num,
        args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        method=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg,
        dist_timeout_s=args.dist_timeout,
        **dict(parse_override(text.removeprefix("sampler.")) for text in args.set),
    )
    if is_main():
        print(f"wrote {args.num} samples to {out} (grid: {out.with_suffix('.png')})")
    return 0


def _submit(args) -> int:
    from vrpo.train.submit import submit

    load_config(args.config, args.set)  # a bad config fails here, not in the queue
    job = submit(args.config, str(args.out), args.set, args.nodes, args.gpus_per_node, args.partition, args.time,
                 args.cluster, tasks_per_node=args.tasks_per_node)  # fmt: skip
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.tasks_per_node or args.gpus_per_node} task(s); "
          f"logs in {Path(args.out).expanduser() / 'slurm'}")  # fmt: skip
    if args.wait:
        job.results()
        print(f"job {job.job_id} finished")
    return 0


def _prepare_latents(args) -> int:
    import time

    from vrpo.data.latents import prepare_latents

    device = init_distributed(args.device, args.dist_timeout)[2]
    start = time.perf_counter()
    manifest = prepare_latents(args.images, args.out, args.vae, args.resolution, args.labels, args.shard_size,
                               args.batch_size, str(device), args.workers)  # fmt: skip
    if is_main():
        seconds = time.perf_counter() - start
        print(f"{manifest['count']} images in {len(manifest['shards'])} shards at {args.out} "
              f"({seconds:.0f} s, {manifest['count'] / seconds:.1f} images/s; finished shards are kept)")  # fmt: skip
    return 0


def _cache_features(args) -> int:
    cfg = load_config(args.config, args.set)
    options = cfg.objective
    if not options.encoder_names():
        raise ConfigError(
            f"objective '{options.name}' uses no encoder: cache-features needs an alignment method (repa, vrpo)"
        )
    if not options.cache_root():
        raise ConfigError(
            "objective.feature_cache is not set: name the folder for the cache (--set objective.feature_cache=DIR)"
        )
    build_feature_caches(
        options.build_encoders(pixel_resolution(cfg.data)),
        options.cache_root(),
        lambda: load_dataset(cfg.data),
        log=print,
        dtype=args.dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
    )
    return 0


def _convert_dinov2(args) -> int:
    from vrpo.encoders.dinov2_convert import convert_dinov2

    try:
        out = convert_dinov2(args.file, args.out, args.heads)
    except ValueError as err:
        raise ConfigError(f"{args.file}: {err}") from None
    print(f"wrote {out} (transformers); use it as objective.encoders=[hf:{out}]")
    return 0


def _import_checkpoint(args) -> int:
    path = import_checkpoint(args.source, args.file, args.out, args.config, args.resolution, args.set)
    print(f"imported {args.file} ({args.source}) into {args.out}: {path.name}")
    print(f"  sample it: vrpo sample --run {args.out} --num 64 --out samples.npz")
    return 0


def _eval(args) -> int:
    device = str(init_distributed(args.device, args.dist_timeout)[2])
    if args.run is not None:
        if args.ref is not None:
            raise EvalError("--ref goes with --samples; --run evaluates on the run's own dataset (--split)")
        # under torchrun the held-out images are spread over the ranks; rank 0 prints and appends
        result = evaluate_representations(
            args.run,
            args.metrics or RUN_METRICS,
            split=args.split,
            dataset=args.dataset,
            timesteps=args.timesteps,
            num=args.num or 1000,
            probe_train=args.probe_train,
            which=args.weights,
            encoder_weights=args.encoder_weights,
            encoder_name=args.encoder,
            encoder_input_size=args.encoder_input_size,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
        )
        step = result["step"]
    else:
        if args.ref is None:
            raise EvalError("--samples needs --ref (NAME:SPLIT, an npz, an image folder or a statistics file)")
        if rank_and_world()[1] > 1:
            raise EvalError("vrpo eval --samples runs in one process (vrpo sample and training spread theirs over "
                            "the ranks): run it without torchrun")  # fmt: skip
        step = args.step
        if args.append and step is None:  # the samples are taken to come from the run's newest checkpoint
            step = newest_checkpoint_step(args.append.parent)
            if step is None:
                raise EvalError(f"--append needs --step: {args.append.parent} has no checkpoint to take it from")
        result = evaluate_samples(
            args.samples,
            args.ref,
            args.metrics or tuple(SAMPLE_METRICS),
            num=args.num,
            ref_num=args.ref_num,
            cache_dir=args.cache_dir,
            data_root=args.data_root,
            encoder_weights=args.encoder_weights,
            encoder_name=args.encoder,
            device=device,
            batch_size=args.batch_size,
            progress=True,
        )
    if not is_main():
        return 0
    if args.append:
        append_record(args.append, metrics_record(step, result))
    print(json.dumps(result))
    return 0


def _summary(args) -> int:
    print("\n".join(run_summary(args.run)))
    return 0


def _plot(args) -> int:
    out = plot_runs(args.runs, args.out, [m.strip() for m in args.metric.split(",") if m.strip()])
    print(f"wrote {out}")
    return 0


def _add_dist_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=float, default=86400.0,
                   help="torchrun: seconds a rank waits on the others in a collective (a resumed rank may have much "
                   "less left)")  # fmt: skip


def _timesteps(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None


def _study(args) -> int:
    spec = load_study(args.config, args.set)
    if args.defer_final:
        spec.final = {}  # a later call without the flag adds the final evaluations to the finished runs
    report = (
        write_report(spec) if args.report_only else run_study(spec, only_seeds=args.seeds, only_methods=args.methods)
    )
    print(f"report: {report} (plot: {report.with_suffix('.png')})")
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
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS))
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sampler option, e.g. encoder_sharing=2 (DDT), representation_guidance=1.5 (ReDi), "
        "global_cfg_scale=1.5 (REG)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    _add_dist_timeout(p)
    p.set_defaults(func=_sample)

    p = sub.add_parser("submit", help="train as a SLURM job through submitit (one task per GPU, requeued)")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=int, default=4320, help="minutes per job (the job requeues itself)")
    p.add_argument("--cluster", default=None, help="local: run the tasks here (a dry run); default: SLURM")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish")
    p.set_defaults(func=_submit)
    p = sub.add_parser("cache-features", help="encode the dataset once with the config's frozen encoders")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000)
    p.set_defaults(func=_cache_features)

    p = sub.add_parser("prepare-latents", help="encode an image folder with a VAE into latent shards (resumable)")
    p.add_argument("--images", required=True, type=Path, help="one subfolder per class, or flat with --labels")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id or local diffusers directory")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--labels", type=Path, default=None, help="flat folder: lines 'RELATIVE_PATH LABEL'")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0, help="processes reading and cropping images (0: in the main one)")
    _add_dist_timeout(p)
    p.set_defaults(func=_prepare_latents)

    p = sub.add_parser("convert-dinov2", help="a torch.hub DINOv2 .pth as a transformers directory (for hf:DIR)")
    p.add_argument("file", type=Path, help="e.g. dinov2_vitb14_pretrain.pth or dinov2_vitb14_reg4_pretrain.pth")
    p.add_argument("--out", required=True, type=Path, help="the new transformers directory")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: width / 64, as published)")
    p.set_defaults(func=_convert_dinov2)

    p = sub.add_parser("import-checkpoint", help="an official REPA, SiT or DiT checkpoint as a run folder")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the code that wrote the file")
    p.add_argument("file", type=Path, help="the .pt file (a training checkpoint or a bare state dict)")
    p.add_argument("--out", required=True, type=Path, help="the new run folder")
    p.add_argument("--config", default=None, help="a config for the run (its model and data keys are set here)")
    p.add_argument("--resolution", type=int, default=None, help="input size, for a file without pos_embed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_import_checkpoint)

    p = sub.add_parser("study", help="run a paired (method x seed) grid and write its report")
    p.add_argument("--config", required=True, help="study YAML, e.g. configs/study/fmnist.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from finished evaluations")
    p.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="run only these of the study's seeds now (e.g. 0,1); the report covers all",
    )
    p.add_argument(
        "--methods",
        type=lambda v: [m for m in v.split(",") if m],
        default=None,
        help="run only these of the study's methods now (e.g. sit,repa); the report covers all",
    )
    p.add_argument(
        "--defer-final",
        action="store_true",
        help="train and evaluate every run (curve_steps included) first, leaving the study's final evaluation "
        "(FID-5k) for a later call",
    )
    p.set_defaults(func=_study)

    p = sub.add_parser(
        "eval",
        help="sample metrics (FID, sFID, precision/recall, FD-encoder) or a run's representation metrics; prints "
        "one JSON object",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", type=Path, help="ADM npz (arr_0: uint8 N x H x W x C) or a folder of images")
    source.add_argument("--run", type=Path, help="run folder: RA, CKNNA and linear probe on held-out images")
    p.add_argument(
        "--ref",
        help="NAME:SPLIT (fashion-mnist:test, mnist:test, digits:test), an npz (ADM's reference batch), an image "
        "folder, a latent folder (its stored crops) or a statistics file",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated; samples: fid,sfid,pr,fd_encoder (default all); run: ra,cknna,probe (default all)",
    )
    p.add_argument(
        "--num",
        type=int,
        default=None,
        help="samples: use the first N (error if fewer); run: held-out images (default 1000)",
    )
    p.add_argument(
        "--ref-num", type=int, default=10_000, help="reference images, a class-balanced subset (default 10000)"
    )
    p.add_argument(
        "--append", type=Path, default=None, metavar="RUN/metrics.jsonl", help="append the metrics with their step"
    )
    p.add_argument(
        "--step", type=int, default=None, help="step recorded with --append (default: the run's newest checkpoint)"
    )
    p.add_argument("--cache-dir", default="~/.cache/vrpo/refstats", help="reference statistics cache")
    p.add_argument(
        "--data-root", default=None, help="folder of the NAME:SPLIT reference's files (default: the usual places)"
    )
    p.add_argument(
        "--encoder-weights",
        default=None,
        help="DINOv2 weights: FD-DINOv2 instead of FD-EfficientNet (and the CKNNA encoder)",
    )
    p.add_argument("--encoder", default="dinov2-vitb14", help="DINOv2 model the weights belong to")
    p.add_argument("--encoder-input-size", type=int, default=224, help="run: CKNNA encoder input size")
    p.add_argument("--split", default="test", help="run: held-out split")
    p.add_argument(
        "--dataset",
        default=None,
        help="run: measure on another dataset (NAME or NAME:SPLIT), e.g. digits:all for transfer",
    )
    p.add_argument(
        "--timesteps", type=_timesteps, default=[0.25, 0.5, 0.75], help="run: noise levels t (0 data, 1 noise)"
    )
    p.add_argument(
        "--probe-train", type=int, default=None, help="run: train images for the linear probe (default --num)"
    )
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="run: which weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    _add_dist_timeout(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="metric curves of runs (their metrics.jsonl) into one PNG")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    p.add_argument("--out", required=True, type=Path, help="PNG file")
    p.add_argument("--metric", default="fid", help="metric key(s), comma-separated, e.g. fid,sfid or cknna@0.5")
    p.set_defaults(func=_plot)

    p = sub.add_parser("summary", help="a few lines on a run: losses, reward weights, metrics, warnings, pictures")
    p.add_argument("--run", required=True, type=Path)
    p.set_defaults(func=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (
        ConfigError,
        DataError,
        CheckpointError,
        CacheMismatch,
        TrainingDiverged,
        FileNotFoundError,
        EvalError,
        PeerLost,
        MissingExtra,  # an optional extra that is not installed: the message says which
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as stop:  # a signal: the loop wrote its checkpoint first, on every rank together
        print(f"error: {stop}", file=sys.stderr)
        code = 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return _close(code)


def _close(code: int) -> int:
    """The ranks that reached the end together wait for each other, then tear the group down (a failing
    rank exits at once instead: its peers learn of it through their own collectives)."""
    try:
        close_distributed()
    except RuntimeError as err:  # torch's DistBackendError: a peer never reached the end
        rank = rank_and_world()[0]
        print(f"error: rank {rank}: its command ended, a peer's did not ({str(err).splitlines()[0][:160]})",
              file=sys.stderr)  # fmt: skip
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
