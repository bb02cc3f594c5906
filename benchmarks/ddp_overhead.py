"""DDP's cost on the CPU (gloo): the same global batch on 2 processes against 1, through the real CLI.

Settings, run in turn round by round so that the machine's drift hits them alike:
  single-1t  one process, 1 intra-op thread (the per-core baseline)
  single-2t  one process, 2 threads (what the 2 cores give without DDP)
  ddp-2x1t   torchrun, 2 ranks of 1 thread each, half the global batch per rank
Each run trains ``--steps`` steps in a throwaway folder; its speed is the images/s that the loop
logs, after the first window (start-up, first allocations) is dropped. Prints one JSON object:
the median images/s per setting and the paired ratios of DDP to each single-process setting
with bootstrap 95% intervals. 2 ranks on 2 cores would reach 2.0x single-1t with free
communication; 1 - ratio / 2 is the share lost to gradient all-reduce and synchronisation.
Example:
    python benchmarks/ddp_overhead.py --config configs/fmnist/sit-t4.yaml --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from alignment_overhead import paired_ratio  # noqa: E402

SETTINGS = {
    "single-1t": (1, 1),  # (processes, threads per process)
    "single-2t": (1, 2),
    "ddp-2x1t": (2, 1),
}


def run_once(config: str, overrides: list[str], processes: int, threads: int, steps: int, log_every: int) -> float:
    """Steady-state images/s of one training run (the logged windows after the first)."""
    folder = Path(tempfile.mkdtemp(prefix="vrpo-ddp-bench-"))
    try:
        sets = [*overrides, f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.threads={threads}",
                f"train.ckpt_every={steps}", "train.progress=false", "train.tensorboard=false", "train.sample_grid=0",
                "eval.every=0"]  # fmt: skip
        command = ["-m", "vrpo.cli", "train", "--config", config, "--out", str(folder / "run")]
        for item in sets:
            command += ["--set", item]
        if processes > 1:
            command = ["torchrun", "--standalone", f"--nproc_per_node={processes}", *command]
        else:
            command = [sys.executable, *command]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"benchmark run failed ({' '.join(command[:4])} ...): {done.stderr.strip()[-500:]}")
        records = [json.loads(line) for line in (folder / "run/log.jsonl").read_text().splitlines()]
        speeds = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
        if not speeds:
            raise SystemExit(f"--steps {steps} leaves no logged window after the first: raise it")
        return statistics.fmean(speeds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fmnist/sit-t4.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if shutil.which("torchrun") is None:
        raise SystemExit("torchrun is not on PATH")
    speeds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (processes, threads) in SETTINGS.items():
            speeds[name].append(run_once(args.config, args.set, processes, threads, args.steps, args.log_every))
    result = {
        "config": args.config,
        "overrides": args.set,
        "steps": args.steps,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "images_per_s": {name: statistics.median(v) for name, v in speeds.items()},
        "runs_images_per_s": speeds,
        # speed ratios: > 1 means DDP is faster
        "ddp_over_single_1t": paired_ratio(speeds["ddp-2x1t"], speeds["single-1t"]),
        "ddp_over_single_2t": paired_ratio(speeds["ddp-2x1t"], speeds["single-2t"]),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
