import gzip
import struct

import numpy as np
import pytest
import torch

from vrpo.data import DataError, balanced_subset, batch_indices, load_split, read_idx


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder, n=20):
    rng = np.random.default_rng(0)
    for stem in ("train", "t10k"):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_mnist_idx_files_at_a_user_path_are_padded_to_32(tmp_path):
    fake_mnist(tmp_path)
    data = load_split("mnist", "train", root=str(tmp_path))
    assert data.images.shape == (20, 1, 32, 32) and data.images.dtype == torch.uint8
    assert data.images[:, :, :2].sum() == 0 and data.labels.tolist()[:3] == [0, 1, 2]
    assert load_split("mnist", "test", root=str(tmp_path), resolution=64).images.shape == (20, 1, 64, 64)


def test_missing_and_malformed_data_say_where_and_how(tmp_path):
    with pytest.raises(DataError, match=rf"not found \(looked in {tmp_path}\).*data.root"):
        load_split("mnist", "train", root=str(tmp_path))
    fake_mnist(tmp_path)
    broken = tmp_path / "train-images-idx3-ubyte.gz"
    broken.write_bytes(gzip.compress(gzip.decompress(broken.read_bytes())[:500]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(broken)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("cifar", "train")


def test_image_folder_is_center_cropped(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 60, 3), 100 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_split("image-folder", root=str(tmp_path), resolution=16)
    assert data.images.shape == (4, 3, 16, 16) and data.num_classes == 2 and data.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match="no class subfolders"):
        load_split("image-folder", root=str(tmp_path / "cat"), resolution=16)


def test_digits_and_balanced_subset():
    data = load_split("digits", "all")
    assert data.images.shape == (1797, 1, 32, 32)
    sub = balanced_subset(data, 100, seed=3)
    assert len(sub) == 100 and torch.bincount(sub.labels, minlength=10).tolist() == [10] * 10
    assert sub.fingerprint != data.fingerprint and balanced_subset(data, 100, seed=3).fingerprint == sub.fingerprint


def test_batch_order_is_step_keyed_and_covers_each_epoch():
    n, b = 50, 16
    seen = torch.cat([batch_indices(s, b, n, seed=1) for s in range(0, 50 * 16 // b)])
    for epoch in range(16):
        assert sorted(seen[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert torch.equal(batch_indices(7, b, n, 1), batch_indices(7, b, n, 1))
    assert not torch.equal(batch_indices(7, b, n, 1), batch_indices(7, b, n, 2))
