"""Inception (FID) throughput on NCHW against channels-last (NHWC) input, batches interleaved; prints JSON.

The evaluation uses NHWC (vrpo.eval.inception). Usage:
    python benchmarks/inception_layout.py [--images 64] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vrpo.eval.inception import InceptionFeatures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8)
    nhwc = InceptionFeatures(batch_size=args.batch)
    nchw = InceptionFeatures(batch_size=args.batch)
    nchw.model = nchw.model.to(memory_format=torch.contiguous_format)
    nchw.layers = nchw.model.net.layers
    to_nchw = nchw.preprocess
    nchw.preprocess = lambda im: to_nchw(im).contiguous()
    seconds = {"nchw": [], "nhwc": []}
    features = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is not counted
        for name, model in (("nchw", nchw), ("nhwc", nhwc)):
            start = time.perf_counter()
            features[name] = model(images)["pool"]
            seconds[name].append(time.perf_counter() - start)
    rate = {k: args.images / sorted(v[1:])[len(v[1:]) // 2] for k, v in seconds.items()}
    print(
        json.dumps(
            {
                "images_per_s_median": {k: round(v, 2) for k, v in rate.items()},
                "nhwc_over_nchw": round(rate["nhwc"] / rate["nchw"], 3),
                "max_abs_pool_difference": float(abs(features["nhwc"] - features["nchw"]).max()),
                "threads": torch.get_num_threads(),
                "images": args.images,
                "rounds": args.rounds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
