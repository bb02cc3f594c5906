"""Improved precision and recall (Kynkaanniemi et al., 2019) over feature vectors.

Each set's manifold is the union of balls centred on its points, radius = the
distance to the point's k-th nearest neighbour within the set (k = 3, as in the
ADM evaluator). Precision = fraction of generated samples inside the reference
manifold; recall = fraction of reference points inside the generated manifold.

Distances are squared Euclidean (comparisons are unchanged by squaring),
computed block by block so 10k x 10k points of 2048 dims never build the full
matrix: peak extra memory is ``row_block_size x N`` floats.
"""

from __future__ import annotations

import torch

from vrpo.utils.types import ArrayLike

__all__ = ["knn_radii", "precision_recall"]


def _as_feature_tensor(features: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(features).detach().to(device=device, dtype=dtype)
    if tensor.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(tensor.shape)}")
    return tensor


def _squared_distances(
    rows: torch.Tensor, rows_sq_norm: torch.Tensor, cols: torch.Tensor, cols_sq_norm: torch.Tensor
) -> torch.Tensor:
    # |a - b|^2 = |a|^2 - 2 a.b + |b|^2 turns the block into one matmul; clamp cancels round-off below 0.
    return (rows_sq_norm[:, None] - 2.0 * rows @ cols.T + cols_sq_norm[None, :]).clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int = 3, row_block_size: int = 1024) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point in the same set, [N]."""
    num_points = features.shape[0]
    if not 1 <= k < num_points:
        raise ValueError(f"k must be in [1, N - 1] = [1, {num_points - 1}], got {k}")
    sq_norm = features.square().sum(dim=1)
    radii = torch.empty(num_points, dtype=features.dtype, device=features.device)
    for start in range(0, num_points, row_block_size):
        stop = min(start + row_block_size, num_points)
        distances = _squared_distances(features[start:stop], sq_norm[start:stop], features, sq_norm)
        # The k+1 smallest include the point itself (distance ~0), so index k is the k-th neighbour.
        radii[start:stop] = distances.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def precision_recall(
    reference_features: ArrayLike,
    sample_features: ArrayLike,
    k: int = 3,
    row_block_size: int = 1024,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Improved precision and recall of ``sample_features`` [M, D] against ``reference_features`` [N, D].

    ``device`` defaults to the reference tensor's device (CPU for numpy);
    ``dtype`` float32 matches the ADM evaluator's fallback precision, float64 is exact.
    """
    if device is None:
        device = reference_features.device if isinstance(reference_features, torch.Tensor) else "cpu"
    device = torch.device(device)
    reference = _as_feature_tensor(reference_features, device, dtype)
    samples = _as_feature_tensor(sample_features, device, dtype)
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(f"feature dims differ: reference {reference.shape[1]}, samples {samples.shape[1]}")

    reference_radii = knn_radii(reference, k, row_block_size)
    sample_radii = knn_radii(samples, k, row_block_size)
    reference_sq_norm = reference.square().sum(dim=1)
    sample_sq_norm = samples.square().sum(dim=1)

    # One pass over reference-by-sample blocks answers both questions.
    sample_in_reference_manifold = torch.zeros(samples.shape[0], dtype=torch.bool, device=device)
    reference_in_sample_manifold = torch.zeros(reference.shape[0], dtype=torch.bool, device=device)
    for start in range(0, reference.shape[0], row_block_size):
        stop = min(start + row_block_size, reference.shape[0])
        distances = _squared_distances(reference[start:stop], reference_sq_norm[start:stop], samples, sample_sq_norm)
        sample_in_reference_manifold |= (distances <= reference_radii[start:stop, None]).any(dim=0)
        reference_in_sample_manifold[start:stop] = (distances <= sample_radii[None, :]).any(dim=1)

    return {
        "precision": sample_in_reference_manifold.double().mean().item(),
        "recall": reference_in_sample_manifold.double().mean().item(),
    }
