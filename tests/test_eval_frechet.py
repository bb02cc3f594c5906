import warnings

import numpy as np
import pytest
import torch

from vrpo.eval.frechet import (
    covariance_factor,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    trace_sqrt_product,
)

scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy is the reference for the sqrtm route")


def scipy_sqrtm_frechet(mu1, sigma1, mu2, sigma2):
    """The TTUR / ADM evaluator route: sqrtm of the non-symmetric product."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy >= 1.16 deprecates disp
        product_root = scipy_linalg.sqrtm(sigma1 @ sigma2)
    mean_difference = mu1 - mu2
    return float(
        mean_difference @ mean_difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(product_root.real)
    )


def random_feature_sets(rng, num_a, num_b, dim):
    features_a = rng.standard_normal((num_a, dim))
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    features_b = rng.standard_normal((num_b, dim)) @ mixing + 0.3
    return features_a, features_b


def data_svd_frechet(features_a, features_b):
    """Independent reference from the data: tr sqrt(S1 S2) = nuclear norm of A_c B_c^T / sqrt((n-1)(m-1))."""
    centered_a = features_a - features_a.mean(axis=0)
    centered_b = features_b - features_b.mean(axis=0)
    scale = np.sqrt((len(features_a) - 1) * (len(features_b) - 1))
    trace_root = np.linalg.svd(centered_a @ centered_b.T, compute_uv=False).sum() / scale
    mean_difference = features_a.mean(axis=0) - features_b.mean(axis=0)
    traces = (centered_a**2).sum() / (len(features_a) - 1) + (centered_b**2).sum() / (len(features_b) - 1)
    return float(mean_difference @ mean_difference + traces - 2.0 * trace_root)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_sqrtm_route_on_well_conditioned_covariances(seed):
    rng = np.random.default_rng(seed)
    features_a, features_b = random_feature_sets(rng, 512, 384, 64)
    mu1, sigma1 = feature_statistics(features_a)
    mu2, sigma2 = feature_statistics(features_b)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    reference = scipy_sqrtm_frechet(mu1, sigma1, mu2, sigma2)
    assert abs(ours - reference) / abs(reference) < 1e-6


def test_random_spd_covariances_match_scipy():
    rng = np.random.default_rng(3)
    dim = 64
    factors = [rng.standard_normal((dim, dim)) for _ in range(2)]
    sigma1, sigma2 = (factor @ factor.T / dim + 0.1 * np.eye(dim) for factor in factors)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(ours - scipy_sqrtm_frechet(mu1, sigma1, mu2, sigma2)) / ours < 1e-6


@pytest.mark.parametrize("num_a,num_b,dim", [(20, 30, 64), (10, 10, 64), (100, 50, 256), (3, 200, 64)])
def test_singular_covariances_finite_and_match_data_svd_reference(num_a, num_b, dim):
    rng = np.random.default_rng(num_a + num_b)
    features_a = 3.0 * rng.standard_normal((num_a, dim))
    features_b = rng.standard_normal((num_b, dim)) + 0.5
    ours = frechet_distance_from_features(features_a, features_b)
    assert np.isfinite(ours)
    assert abs(ours - data_svd_frechet(features_a, features_b)) / ours < 1e-10


@pytest.mark.parametrize("num_a,num_b,dim", [(20, 30, 64), (3, 200, 64), (100, 500, 256)])
def test_the_small_sample_route_through_the_features_equals_the_two_eigendecompositions(num_a, num_b, dim):
    """With fewer samples than dimensions, the n x n route gives the same distance (and the data-SVD one)."""
    rng = np.random.default_rng(num_a)
    features_a, features_b = random_feature_sets(rng, num_a, num_b, dim)
    mu1, sigma1 = feature_statistics(features_a)
    mu2, sigma2 = feature_statistics(features_b)
    factor = covariance_factor(features_a)
    np.testing.assert_allclose(factor.T @ factor, sigma1, atol=1e-12)
    fast = frechet_distance(mu1, sigma1, mu2, sigma2, factor)
    assert fast == pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-10)
    assert fast == pytest.approx(data_svd_frechet(features_a, features_b), rel=1e-10)


def test_trace_sqrt_product_of_commuting_diagonals():
    sigma1 = np.diag([4.0, 9.0, 0.0, 1.0])
    sigma2 = np.diag([1.0, 4.0, 5.0, 0.0])
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(2.0 + 6.0, rel=1e-14)


def test_identical_sets_give_zero_and_noise_grows_distance_monotonically():
    rng = np.random.default_rng(4)
    clean = rng.standard_normal((400, 32))
    assert frechet_distance_from_features(clean, clean) < 1e-9
    noise = rng.standard_normal(clean.shape)
    distances = [frechet_distance_from_features(clean, clean + scale * noise) for scale in (0.1, 0.3, 1.0, 3.0)]
    assert all(smaller < larger for smaller, larger in zip(distances, distances[1:]))


def test_torch_and_numpy_inputs_agree_and_statistics_are_float64():
    rng = np.random.default_rng(5)
    features_a, features_b = random_feature_sets(rng, 64, 64, 16)
    mean, covariance = feature_statistics(torch.from_numpy(features_a).float())
    assert mean.dtype == np.float64 and covariance.dtype == np.float64
    np.testing.assert_allclose(covariance, np.cov(features_a.astype(np.float32), rowvar=False), rtol=1e-5, atol=1e-6)
    from_numpy = frechet_distance_from_features(features_a, features_b)
    from_torch = frechet_distance_from_features(torch.from_numpy(features_a), torch.from_numpy(features_b))
    assert from_torch == pytest.approx(from_numpy, rel=1e-12)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="equal in length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 8)))
