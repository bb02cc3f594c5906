"""Frechet distance between Gaussians fitted to feature sets (FID, sFID).

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).

The usual route (TTUR, ADM evaluator) calls ``scipy.linalg.sqrtm`` on the
non-symmetric product S1 S2, which is slow at 2048 dims and goes complex or
non-finite when a covariance is singular (fewer samples than dimensions).
Here the trace term uses only symmetric eigendecompositions:

    S1 S2 is similar to sqrt(S1) S2 sqrt(S1), which is symmetric PSD, so
    tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1))).

Both eigendecompositions run in float64 with round-off eigenvalues (negative,
or below size * eps * largest) set to zero, so singular covariances give a
finite value that matches an SVD-of-the-data reference to ~1e-15.

With the features behind S1 at hand and fewer of them than dimensions (FID-1k: 1000 samples,
2048 dims), S1 = A^T A with A the centred features / sqrt(n - 1), and S1 S2 = A^T (A S2) has
the nonzero eigenvalues of the n x n matrix A S2 A^T: the trace needs that one small
eigendecomposition instead of two at 2048.
"""

from __future__ import annotations

import numpy as np
import torch

from vrpo.utils.types import ArrayLike

__all__ = [
    "as_float64_numpy",
    "covariance_factor",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "trace_sqrt_product",
]


def as_float64_numpy(values: ArrayLike) -> np.ndarray:
    """Return ``values`` (numpy array or torch tensor, any device) as a float64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _clip_roundoff_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are indistinguishable from round-off.

    A rank-deficient covariance has exact-zero eigenvalues that eigh returns as
    +-(size * eps * largest); their square roots (~1e-8 each) would add up to a
    visible bias in the trace, so they are zeroed like a pseudo-inverse cutoff.
    """
    if eigenvalues.size == 0:
        return eigenvalues
    tolerance = eigenvalues.size * np.finfo(np.float64).eps * float(np.abs(eigenvalues).max())
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _symmetric_psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    root_eigenvalues = np.sqrt(_clip_roundoff_eigenvalues(eigenvalues))
    return (eigenvectors * root_eigenvalues) @ eigenvectors.T


def _trace_sqrt_psd(matrix: np.ndarray) -> float:
    """The sum of the square roots of a symmetric PSD matrix's eigenvalues (round-off zeroed)."""
    eigenvalues = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    return float(np.sqrt(_clip_roundoff_eigenvalues(eigenvalues)).sum())


def covariance_factor(features: ArrayLike) -> np.ndarray:
    """A [N, D] with A^T A the unbiased covariance of ``features`` [N, D]: the centred rows / sqrt(N - 1)."""
    features = as_float64_numpy(features)
    return (features - features.mean(axis=0)) / np.sqrt(features.shape[0] - 1)


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike, factor1: ArrayLike | None = None) -> float:
    """tr(sqrt(sigma1 @ sigma2)) for symmetric PSD matrices, via two symmetric eigendecompositions, or
    one of ``factor1 sigma2 factor1^T`` when ``factor1`` [n, D] (sigma1 = factor1^T factor1) has n < D."""
    sigma2 = as_float64_numpy(sigma2)
    if factor1 is not None and (factor1 := as_float64_numpy(factor1)).shape[0] < factor1.shape[1]:
        return _trace_sqrt_psd(factor1 @ sigma2 @ factor1.T)
    sigma1 = as_float64_numpy(sigma1)
    # eigh reads one triangle only; symmetrising first keeps both triangles' information.
    sqrt_sigma1 = _symmetric_psd_sqrt(0.5 * (sigma1 + sigma1.T))
    return _trace_sqrt_psd(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, factor1: ArrayLike | None = None
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Accepts numpy arrays or torch tensors. The result is clipped at 0: the true
    distance is non-negative and only round-off can push it below. ``factor1``: the
    ``covariance_factor`` of the features behind sigma1, when at hand (faster with few samples).
    """
    mu1, mu2 = np.atleast_1d(as_float64_numpy(mu1)), np.atleast_1d(as_float64_numpy(mu2))
    sigma1, sigma2 = np.atleast_2d(as_float64_numpy(sigma1)), np.atleast_2d(as_float64_numpy(sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D and equal in length, got {mu1.shape} and {mu2.shape}")
    expected_cov_shape = (mu1.shape[0], mu1.shape[0])
    if sigma1.shape != expected_cov_shape or sigma2.shape != expected_cov_shape:
        raise ValueError(
            f"covariances must be {expected_cov_shape} to match the means, got {sigma1.shape} and {sigma2.shape}"
        )
    mean_difference = mu1 - mu2
    distance = (
        mean_difference @ mean_difference
        + np.trace(sigma1)
        + np.trace(sigma2)
        - 2.0 * trace_sqrt_product(sigma1, sigma2, factor1)
    )
    if not np.isfinite(distance):
        raise ValueError("Frechet distance is not finite: the statistics contain NaN or inf")
    return max(float(distance), 0.0)


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (N - 1 denominator, as ``np.cov``) of ``features`` [N, D], in float64."""
    features = as_float64_numpy(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    mean = features.mean(axis=0)
    centered = features - mean
    covariance = centered.T @ centered / (features.shape[0] - 1)
    return mean, covariance


def frechet_distance_from_features(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    mean_a, covariance_a = feature_statistics(features_a)
    mean_b, covariance_b = feature_statistics(features_b)
    return frechet_distance(mean_a, covariance_a, mean_b, covariance_b)
