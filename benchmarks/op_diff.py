"""Which aten ops make one training step slower than another's; prints JSON.

Two configs (default: VRPO v2 against REPA on SiT-T/4, cached targets) are built side by side,
timed interleaved (median ms per step), then profiled over ``--profiled`` steps each; the ops
are listed by the difference in their self time per step, largest first, with the share of the
difference that matrix products (mm, addmm, bmm, attention) account for.

    python benchmarks/op_diff.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from step_roofline import is_gemm  # noqa: E402

DEFAULTS = {
    "slower": ("configs/fmnist/vrpo-t2.yaml", ["objective.warmup_steps=0"]),
    "faster": ("configs/fmnist/repa-t4.yaml", []),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slower", default=DEFAULTS["slower"][0], help="config expected to be slower")
    parser.add_argument("--faster", default=DEFAULTS["faster"][0], help="config it is compared with")
    parser.add_argument("--set", action="append", default=["model.arch=SiT-T/4"], metavar="KEY=VALUE",
                        help="override for both (default: model.arch=SiT-T/4)")  # fmt: skip
    parser.add_argument("--slower-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the slower config alone, e.g. 'objective.rewards=[semantic]'")  # fmt: skip
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profiled", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vrpo.config import load_config
    from vrpo.train.loop import Trainer

    base = ["optim.lr=1e-3", "optim.warmup_steps=0", "train.batch_size=64", "train.progress=false",
            "train.tensorboard=false", f"train.max_steps={args.steps + args.profiled + 10}", *args.set]  # fmt: skip
    configs = {"slower": args.slower, "faster": args.faster}
    own = {name: DEFAULTS[name][1] if path == DEFAULTS[name][0] else [] for name, path in configs.items()}
    own["slower"] += args.slower_set
    with tempfile.TemporaryDirectory() as root:
        trainers = {n: Trainer(load_config(p, [*base, *own[n]]), f"{root}/{n}") for n, p in configs.items()}
        for _ in range(3):
            for trainer in trainers.values():
                trainer.train_one_step()
        times = {name: [] for name in trainers}
        for _ in range(args.steps):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_one_step()
                times[name].append(time.perf_counter() - start)
        self_ms = {name: Counter() for name in trainers}
        for _ in range(args.profiled):
            for name, trainer in trainers.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    trainer.train_one_step()
                for event in prof.key_averages():
                    self_ms[name][event.key] += event.self_cpu_time_total / 1000 / args.profiled
    slower, faster = self_ms["slower"], self_ms["faster"]
    diff = {key: slower[key] - faster[key] for key in set(slower) | set(faster)}
    total = sum(diff.values())
    result = {
        "slower": args.slower,
        "faster": args.faster,
        "sets": args.set,
        "slower_sets": args.slower_set,
        "ms_per_step_median": {name: round(1000 * statistics.median(v), 1) for name, v in times.items()},
        "profiled_ms_per_step": {name: round(sum(c.values()), 1) for name, c in self_ms.items()},
        "difference_ms": round(total, 1),
        "gemm_share_of_difference": round(sum(v for k, v in diff.items() if is_gemm(k)) / total, 3),
        "ops_by_difference_ms": [[k, round(v, 1)] for k, v in sorted(diff.items(), key=lambda kv: -kv[1])][: args.top],
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
