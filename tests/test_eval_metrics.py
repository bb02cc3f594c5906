import json

import numpy as np
import pytest
import torch

from vrpo.eval.alignment import cknna, hsic_unbiased, linear_probe_accuracy, representation_alignment
from vrpo.eval.prdc import knn_radii, precision_recall
from vrpo.eval.refstats import FINGERPRINT_KEY, dataset_fingerprint, load_reference_stats, save_reference_stats

EXTRACTOR_INFO = {"feature_extractor": "test-net", "feature_extractor_version": "1", "resize": "none"}


# ---- precision / recall -------------------------------------------------------------------------


def brute_force_precision_recall(reference, samples, k):
    """Direct definition with explicit Euclidean distances, no blocking."""

    def radii(points):
        distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(distances, axis=1)[:, k]

    cross = np.linalg.norm(reference[:, None] - samples[None], axis=-1)
    precision = (cross <= radii(reference)[:, None]).any(axis=0).mean()
    recall = (cross <= radii(samples)[None, :]).any(axis=1).mean()
    return precision, recall


def test_identical_sets_have_precision_and_recall_one():
    features = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    assert precision_recall(features, features.clone(), row_block_size=64) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_match_brute_force_with_blocking():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((157, 8))
    samples = 1.5 * rng.standard_normal((131, 8)) + 0.7
    expected = brute_force_precision_recall(reference, samples, k=3)
    result = precision_recall(reference, samples, k=3, row_block_size=50, dtype=torch.float64)
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < result["precision"] < 1.0 and 0.0 < result["recall"] < 1.0


def test_disjoint_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((50, 4))
    assert precision_recall(reference, reference + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_knn_radii_is_kth_neighbour_squared_distance():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=torch.float64)
    # 3rd nearest other point of 0 is 6 -> 36; of 1 is 6 -> 25; of 10 is 1 -> 81.
    assert knn_radii(points, k=3, row_block_size=2).tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]


# ---- CKNNA, RA, linear probe --------------------------------------------------------------------


def test_cknna_of_representation_with_itself_and_rotation_is_one():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(200, 48, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    assert cknna(features, features, k=10) == pytest.approx(1.0, abs=1e-12)
    assert cknna(features, features.double() @ rotation, k=10) == pytest.approx(1.0, abs=1e-6)


def test_cknna_of_independent_noise_is_near_zero_and_related_data_in_between():
    generator = torch.Generator().manual_seed(4)
    features_a = torch.randn(500, 64, generator=generator)
    noise = torch.randn(500, 32, generator=generator)
    assert abs(cknna(features_a, noise, k=10)) < 0.1
    related = cknna(features_a, features_a[:, :32] + 0.5 * noise, k=10)
    assert 0.1 < related < 0.9


def test_hsic_unbiased_matches_song_et_al_formula():
    rng = np.random.default_rng(5)
    n = 9
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
    kernel_k, kernel_l = x @ x.T, y @ y.T
    k_tilde, l_tilde = kernel_k - np.diag(np.diag(kernel_k)), kernel_l - np.diag(np.diag(kernel_l))
    ones = np.ones(n)
    expected = (
        np.trace(k_tilde @ l_tilde)
        + (ones @ k_tilde @ ones) * (ones @ l_tilde @ ones) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * ones @ k_tilde @ l_tilde @ ones
    ) / (n * (n - 3))
    assert hsic_unbiased(torch.from_numpy(kernel_k), torch.from_numpy(kernel_l)).item() == pytest.approx(expected)


def test_cknna_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        cknna(torch.randn(10, 4), torch.randn(10, 4), k=10)


def test_representation_alignment_matches_direct_cosine_formula():
    rng = np.random.default_rng(6)
    projected, targets = rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 5, 8))
    dots = (projected * targets).sum(-1)
    norms = np.linalg.norm(projected, axis=-1) * np.linalg.norm(targets, axis=-1)
    assert representation_alignment(projected, targets) == pytest.approx((dots / norms).mean(), rel=1e-12)
    assert representation_alignment(torch.from_numpy(targets), torch.from_numpy(2.0 * targets)) == pytest.approx(1.0)


def test_linear_probe_separates_clusters_and_is_chance_on_noise():
    generator = torch.Generator().manual_seed(7)
    class_means = 3.0 * torch.randn(4, 16, generator=generator)
    labels = torch.randint(0, 4, (400,), generator=generator)
    features = class_means[labels] + torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:]) > 0.95
    noise = torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.5


# ---- reference statistics cache -----------------------------------------------------------------


def test_refstats_round_trip_without_pickle(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    fingerprint = dataset_fingerprint(images, EXTRACTOR_INFO)
    stats = {"mu": np.arange(3.0), "sigma": np.eye(3)}
    path = tmp_path / "cache" / "ref_stats.npz"
    save_reference_stats(path, stats, fingerprint)
    loaded = load_reference_stats(path, dataset_fingerprint(torch.from_numpy(images), EXTRACTOR_INFO))
    assert set(loaded) == {"mu", "sigma"}
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    with np.load(path, allow_pickle=False) as archive:
        assert json.loads(str(archive[FINGERPRINT_KEY][0])) == fingerprint
    assert not list(path.parent.glob("*.tmp"))


def test_refstats_writers_in_two_processes_do_not_collide(tmp_path, monkeypatch):
    """Two processes computing the same reference statistics (parallel study runs) both succeed:
    here a second writer runs to completion while the first is still writing its file."""
    import os

    import vrpo.eval.refstats as refstats

    path = tmp_path / "ref_stats.npz"
    fingerprint = dataset_fingerprint(np.zeros((2, 1, 4, 4), dtype=np.uint8), EXTRACTOR_INFO)
    savez, pid = np.savez, os.getpid()

    def interleaved(handle, **arrays):
        savez(handle, **arrays)
        if os.getpid() == pid:  # the first writer, mid-write: another process writes the same file
            monkeypatch.setattr(os, "getpid", lambda: pid + 1)
            save_reference_stats(path, {"mu": np.ones(2)}, fingerprint)
            monkeypatch.setattr(os, "getpid", lambda: pid)

    monkeypatch.setattr(refstats.np, "savez", interleaved)
    save_reference_stats(path, {"mu": np.zeros(2)}, fingerprint)
    np.testing.assert_array_equal(load_reference_stats(path, fingerprint)["mu"], np.zeros(2))  # the last rename wins
    assert [p.name for p in tmp_path.iterdir()] == ["ref_stats.npz"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path, monkeypatch):
    import vrpo.eval.refstats as refstats

    def broken(handle, **arrays):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(refstats.np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        save_reference_stats(tmp_path / "ref.npz", {"mu": np.zeros(2)}, {"data_sha256": "x"})
    assert list(tmp_path.iterdir()) == []


def test_refstats_refuses_stale_or_foreign_cache_naming_keys(tmp_path):
    images = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    save_reference_stats(path, {"mu": np.zeros(2)}, dataset_fingerprint(images, EXTRACTOR_INFO))
    changed_images = images.copy()
    changed_images[0, 0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"stale or foreign.*data_sha256") as refusal:
        load_reference_stats(path, dataset_fingerprint(changed_images, EXTRACTOR_INFO))
    assert "\n" not in str(refusal.value)
    other_extractor = {**EXTRACTOR_INFO, "resize": "nearest", "feature_extractor_version": "2"}
    with pytest.raises(ValueError, match="feature_extractor_version, resize"):
        load_reference_stats(path, dataset_fingerprint(images, other_extractor))
    with pytest.raises(ValueError, match="extra_key"):
        load_reference_stats(path, {**dataset_fingerprint(images, EXTRACTOR_INFO), "extra_key": 1})


def test_fingerprint_depends_on_shape_and_default_names_the_inception_extractor():
    flat = np.arange(48, dtype=np.uint8)
    assert (
        dataset_fingerprint(flat.reshape(1, 3, 4, 4), EXTRACTOR_INFO)["data_sha256"]
        != dataset_fingerprint(flat.reshape(3, 1, 4, 4), EXTRACTOR_INFO)["data_sha256"]
    )
    default = dataset_fingerprint(flat.reshape(1, 3, 4, 4))
    assert {"feature_extractor", "feature_extractor_version", "resize"} <= set(default)
    with pytest.raises(TypeError, match="uint8"):
        dataset_fingerprint(flat.astype(np.float32))
