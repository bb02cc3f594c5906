"""Retrain the first steps of an archived study run and compare its logged losses with the archive.

A check that the current code still trains what an archived run trained (e.g. VRPO's version-1
preset against the version-1 runs of docs/results/): it builds the run's feature cache if missing,
trains ``--steps`` steps of the study's resolved config for (method, seed) in a temporary folder, and
prints one JSON object with the largest relative difference per logged key. Example:
    python scripts/reproduce_archived_losses.py --study configs/study/fmnist.yaml --method vrpo --seed 0 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vrpo.study.runner import ensure_feature_cache
from vrpo.study.spec import archive_dir, load_study, method_config
from vrpo.train import train
from vrpo.utils.jsonl import read_log

KEYS = ("loss", "loss_denoise", "loss_align", "lambda_s", "R_mean", "w_semantic", "w_stability", "w_fidelity")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    spec = load_study(args.study)
    archived = read_log(archive_dir(spec, args.method, args.seed) / "log.jsonl")
    if not archived:
        print(
            f"error: no archived log for {args.method} seed {args.seed} in {archive_dir(spec, args.method, args.seed)}"
        )
        return 1
    cfg = method_config(spec, args.method, args.seed)
    ensure_feature_cache(cfg)
    cfg.train.max_steps, cfg.train.progress, cfg.train.tensorboard = args.steps, False, False
    cfg.train.ckpt_every, cfg.eval.every, cfg.train.sample_every = args.steps, 0, 0
    with tempfile.TemporaryDirectory() as run:
        train(cfg, Path(run) / "run")
        now = {r["step"]: r for r in read_log(Path(run) / "run" / "log.jsonl")}
    then = {r["step"]: r for r in archived if r["step"] in now}
    worst = {}
    for key in KEYS:
        pairs = [(now[s][key], then[s][key]) for s in then if key in now[s] and key in then[s]]
        if pairs:
            worst[key] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
    print(json.dumps({"study": args.study, "method": args.method, "seed": args.seed, "steps": sorted(then),
                      "max_relative_difference": worst}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
