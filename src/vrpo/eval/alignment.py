"""Representation-alignment metrics: CKNNA, token cosine alignment (RA), linear probe accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vrpo.utils.types import ArrayLike

__all__ = ["cknna", "hsic_unbiased", "linear_probe_accuracy", "representation_alignment"]


def _as_float64_tensor(values: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(values).detach().to(dtype=torch.float64)


def hsic_unbiased(kernel_k: torch.Tensor, kernel_l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator of Song et al. 2012 (JMLR, eq. 5) for [n, n] kernels, n >= 4.

    Centring is implicit in the estimator, which is why raw inner-product
    kernels are passed in. The first term pairs K with L transposed so that
    non-symmetric (masked) kernels are handled as in the platonic-rep code.
    """
    n = kernel_k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    k_off_diagonal = kernel_k.clone().fill_diagonal_(0)
    l_off_diagonal = kernel_l.clone().fill_diagonal_(0)
    elementwise_term = (k_off_diagonal * l_off_diagonal.T).sum()
    sums_term = k_off_diagonal.sum() * l_off_diagonal.sum() / ((n - 1) * (n - 2))
    row_term = 2.0 * (k_off_diagonal @ l_off_diagonal).sum() / (n - 2)
    return (elementwise_term + sums_term - row_term) / (n * (n - 3))


def _knn_mask(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """[n, n] 0/1 mask of each row's k most similar other points (self excluded)."""
    similarities = kernel.clone().fill_diagonal_(float("-inf"))
    neighbour_indices = similarities.topk(k, dim=1).indices
    return torch.zeros_like(kernel).scatter_(1, neighbour_indices, 1.0)


def _mutual_knn_hsic(kernel_k: torch.Tensor, kernel_l: torch.Tensor, k: int) -> torch.Tensor:
    mutual_mask = _knn_mask(kernel_k, k) * _knn_mask(kernel_l, k)
    return hsic_unbiased(mutual_mask * kernel_k, mutual_mask * kernel_l)


def cknna(feats_a: ArrayLike, feats_b: ArrayLike, k: int = 10, normalize: bool = True) -> float:
    """Centered kernel nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    With linear kernels K = A A^T and L = B B^T, only pairs (i, j) where j is among
    the k nearest neighbours of i in BOTH spaces are kept (mask M), and

        CKNNA = HSIC(M*K, M*L) / sqrt(HSIC(M_K*K, M_K*K) * HSIC(M_L*L, M_L*L))

    with the unbiased HSIC estimator (which centres the kernels). ``normalize``
    L2-normalises each row first, as platonic-rep's ``measure_alignment`` does
    before every metric (its 95% outlier clipping is not applied here).
    Unlike the reference code, the denominator gets no +1e-6: that offset pulls
    small-magnitude kernels toward 0, and a self-comparison should give exactly 1.
    Returns NaN when a self-similarity term is not positive (alignment undefined).
    Computed in float64; feats_a [N, Da] and feats_b [N, Db] are paired by row.
    """
    features_a = _as_float64_tensor(feats_a)
    features_b = _as_float64_tensor(feats_b).to(features_a.device)
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[0] != features_b.shape[0]:
        raise ValueError(
            f"expected paired [N, Da] and [N, Db] features, got {tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    num_samples = features_a.shape[0]
    if not 2 <= k <= num_samples - 1:
        raise ValueError(f"k must be in [2, N - 1] = [2, {num_samples - 1}], got {k}")
    if normalize:
        features_a = F.normalize(features_a, dim=-1)
        features_b = F.normalize(features_b, dim=-1)
    kernel_a = features_a @ features_a.T
    kernel_b = features_b @ features_b.T
    cross = _mutual_knn_hsic(kernel_a, kernel_b, k)
    self_a = _mutual_knn_hsic(kernel_a, kernel_a, k)
    self_b = _mutual_knn_hsic(kernel_b, kernel_b, k)
    denominator_squared = (self_a * self_b).item()
    if not denominator_squared > 0:
        return math.nan
    return cross.item() / math.sqrt(denominator_squared)


def representation_alignment(projected: ArrayLike, targets: ArrayLike) -> float:
    """RA of the VRPO paper: cosine similarity between projected and target tokens, averaged over tokens and samples.

    Shapes [B, N, D] (or any leading shape, features last) and must match.
    """
    projected_tokens = _as_float64_tensor(projected)
    target_tokens = _as_float64_tensor(targets).to(projected_tokens.device)
    if projected_tokens.shape != target_tokens.shape:
        raise ValueError(
            f"projected and target shapes differ: {tuple(projected_tokens.shape)} vs {tuple(target_tokens.shape)}"
        )
    return F.cosine_similarity(projected_tokens, target_tokens, dim=-1).mean().item()


def linear_probe_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    weight_decay: float = 1e-4,
    max_iterations: int = 200,
) -> float:
    """Test accuracy of multinomial logistic regression trained full-batch with L-BFGS.

    Features are standardised with the training mean and std (zero-variance
    dims are left unscaled). ``weight_decay`` is the L2 penalty on the weights
    (not the bias), added to the mean cross-entropy. Float64, deterministic.
    """
    train_features = _as_float64_tensor(train_x)
    test_features = _as_float64_tensor(test_x).to(train_features.device)
    train_labels = torch.as_tensor(train_y).long().to(train_features.device)
    test_labels = torch.as_tensor(test_y).long().to(train_features.device)
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            "expected [N, D] train and test features, "
            f"got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if train_labels.shape != (train_features.shape[0],) or test_labels.shape != (test_features.shape[0],):
        raise ValueError("labels must be 1-D with one entry per feature row")

    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    train_features = (train_features - mean) / std
    test_features = (test_features - mean) / std

    num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    parameter_options = {"dtype": torch.float64, "device": train_features.device, "requires_grad": True}
    weight = torch.zeros(train_features.shape[1], num_classes, **parameter_options)
    bias = torch.zeros(num_classes, **parameter_options)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = train_features @ weight + bias
        loss = F.cross_entropy(logits, train_labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predictions = (test_features @ weight + bias).argmax(dim=1)
    return (predictions == test_labels).double().mean().item()
