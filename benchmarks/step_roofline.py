"""Where a training step's time goes, against what the machine can do; prints JSON.

One step of a config (default: REPA SiT-T/4, batch 64, cached targets, as the official-step
benchmark) is counted (FLOPs by ``torch.utils.flop_counter``), timed (median of ``--steps``) and
profiled (self time per aten op). The machine's fp32 matrix-multiply rate is measured in the same
process on a large square product and on the step's own commonest product shape. From these:

- ``achieved_gflops``: the step's FLOPs over its time;
- ``gemm_share``: the fraction of the profiled time spent in matrix products (mm, addmm, bmm,
  attention, convolution);
- ``ceiling_speedup``: step time over (FLOPs / square-product rate), the most any rewrite that keeps
  the arithmetic (and fp32) could gain, were every other op free (``1 / gemm_share`` bounds what
  fusing the other ops alone can give);
- ``adamw_step_ms``: AdamW alone over the step's parameters, torch's default path against the fused one.

    python benchmarks/step_roofline.py --steps 10
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

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "attention", "convolution", "conv2d")


def matmul_rate(m: int, k: int, n: int, seconds: float = 2.0, dtype=torch.float32) -> float:
    """GFLOP/s of repeated [m, k] @ [k, n] products for about ``seconds``."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def adamw_paths(params: list, rounds: int = 20) -> dict:
    """Median ms of one AdamW step over tensors shaped as ``params``, torch's default path against the
    fused kernel (``optim.fused``), interleaved."""
    copies = {path: [torch.zeros_like(p, requires_grad=True) for p in params] for path in ("default", "fused")}
    optimizers = {}
    for path, tensors in copies.items():
        for t in tensors:
            t.grad = torch.randn_like(t)
        optimizers[path] = torch.optim.AdamW(tensors, lr=1e-4, fused=True if path == "fused" else None)
    times = {path: [] for path in optimizers}
    for _ in range(rounds):
        for path, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[path].append(time.perf_counter() - start)
    return {path: round(1000 * statistics.median(v), 2) for path, v in times.items()}


def is_gemm(name: str) -> bool:
    return any(op in name.removeprefix("aten::") for op in GEMM_OPS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fmnist/repa-t4.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=12, help="non-product ops listed by self time")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vrpo.config import load_config
    from vrpo.train.loop import Trainer

    total = args.steps + args.warmup + 2
    sets = ["optim.lr=1e-3", "optim.warmup_steps=0", f"train.batch_size={args.batch}", "train.progress=false",
            "train.tensorboard=false", "optim.grad_clip=1.0", f"train.max_steps={total}", *args.set]  # fmt: skip
    shapes: Counter = Counter()
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(load_config(args.config, sets), root)
        for _ in range(args.warmup):
            trainer.train_one_step()
        with FlopCounterMode(display=False) as counter:
            trainer.train_one_step()
        flops = counter.get_total_flops()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer.train_one_step()
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            trainer.train_one_step()
        params = [p.detach() for p in trainer.params]
    self_us: Counter = Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        self_us[event.key] += event.self_cpu_time_total
        if event.key in ("aten::mm", "aten::addmm") and event.input_shapes:
            dims = [tuple(s) for s in event.input_shapes if len(s) == 2]
            if len(dims) >= 2:
                (m, k), (_, n) = dims[-2], dims[-1]
                shapes[(m, k, n)] += event.count
    profiled = sum(self_us.values())
    gemm_us = sum(v for k, v in self_us.items() if is_gemm(k))
    step_s = statistics.median(times)
    square = matmul_rate(2048, 2048, 2048)
    common = shapes.most_common(1)[0][0] if shapes else (4096, 192, 768)
    own = matmul_rate(*common)
    others = [(k, round(v / profiled, 4)) for k, v in self_us.most_common() if not is_gemm(k)][: args.top]
    result = {
        "config": args.config,
        "sets": args.set,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "step_ms": round(1000 * step_s, 1),
        "step_gflop": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / step_s / 1e9, 1),
        "matmul_gflops_square_2048": round(square, 1),
        "matmul_gflops_commonest_shape": {"mkn": list(common), "gflops": round(own, 1)},
        # lower precision helps only where the hardware has it (AVX-512 BF16, AMX, a GPU's tensor cores)
        "matmul_gflops_square_512_low_precision": {
            str(dtype).removeprefix("torch."): round(matmul_rate(512, 512, 512, dtype=dtype), 2)
            for dtype in (torch.bfloat16, torch.float16)
        },
        "gemm_share": round(gemm_us / profiled, 3),
        "ceiling_speedup": round(step_s / (flops / (square * 1e9)), 2),
        "other_ops_share_of_profiled": others,
        "parameters": sum(p.numel() for p in params),
        "adamw_step_ms": adamw_paths(params),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
