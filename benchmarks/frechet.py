"""Time vrpo's eigh-based Frechet distance against scipy's sqrtm route at FID size; prints JSON.
With fewer samples than dimensions (FID-1k) it times the route through the samples' features too.

Usage: python benchmarks/frechet.py [--dim 2048] [--samples 4096] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import scipy.linalg

from vrpo.eval.frechet import covariance_factor, feature_statistics, frechet_distance


def scipy_sqrtm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """TTUR / ADM evaluator route: sqrtm of the non-symmetric product, real part of its trace."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex-result / deprecated-argument warnings from sqrtm
        product_root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    mean_difference = mu1 - mu2
    return float(
        mean_difference @ mean_difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(product_root).real
    )


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    # Correlated, shifted second set so the distance is far from zero, like real vs generated features.
    features_a = rng.standard_normal((args.samples, args.dim))
    mixing = np.eye(args.dim) + rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)
    features_b = rng.standard_normal((args.samples, args.dim)) @ mixing + 0.05
    statistics = (*feature_statistics(features_a), *feature_statistics(features_b))

    ours, ours_seconds = timed(frechet_distance, *statistics)
    reference, scipy_seconds = timed(scipy_sqrtm_frechet, *statistics)
    fast = {}
    if args.samples < args.dim:  # the n x n route: one small eigendecomposition
        value, seconds = timed(frechet_distance, *statistics, covariance_factor(features_a))
        fast = {"vrpo_factor_seconds": round(seconds, 3), "factor_speedup_over_eigh": round(ours_seconds / seconds, 1),
                "factor_rel_difference": abs(value - ours) / abs(ours)}  # fmt: skip
    print(
        json.dumps(
            {
                **fast,
                "dim": args.dim,
                "samples": args.samples,
                "vrpo_eigh_seconds": round(ours_seconds, 3),
                "scipy_sqrtm_seconds": round(scipy_seconds, 3),
                "speedup": round(scipy_seconds / ours_seconds, 2),
                "vrpo_fd": ours,
                "scipy_fd": reference,
                "abs_difference": abs(ours - reference),
                "rel_difference": abs(ours - reference) / abs(reference),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
