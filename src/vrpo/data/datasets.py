"""Datasets held in memory as uint8 images [N, C, H, W] (or float latents) with int64 labels.

Fashion-MNIST and MNIST come from their idx files (gz or raw), padded from 28 to 32 pixels;
scikit-learn's 8 x 8 digits (upsampled) are the offline out-of-domain set; an image folder
(one subfolder per class) is center-cropped ADM-style; pre-encoded tensors (latents) come
from safetensors shards.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vrpo.utils.images import to_model_space


class DataError(RuntimeError):
    """Missing or malformed data, phrased as one line that says where we looked."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W] pixels, or float [N, C, H, W] latents
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def is_latent(self) -> bool:
        return self.images.dtype != torch.uint8

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def pixel_resolution(self) -> int:
        """The side of the images the encoders see (the latents' side for pre-encoded tensors)."""
        return self.resolution

    def batch_rows(self, index: torch.Tensor, generator: torch.Generator | None = None):
        """(float latents or None, uint8 pixels or None) of these rows."""
        rows = self.images[index]
        return (rows.float(), None) if self.is_latent else (None, rows)

    def pixels(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The uint8 images of these rows (all when None), for encoders and reference statistics."""
        if self.is_latent:
            raise DataError(f"{self.name} holds latents without their images: encoders and FID need pixels")
        return self.images if index is None else self.images[index]

    def subset(self, index: torch.Tensor, name: str) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.num_classes, name)

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.name}|{tuple(self.images.shape)}|{self.images.dtype}".encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.numpy().astype(np.int64).tobytes())
        return digest.hexdigest()[:16]


# ---------------------------------------------------------------- idx files (MNIST family)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SEARCH_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist", "~/.cache/vrpo/fashion-mnist", "data/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist", "~/.cache/vrpo/mnist", "data/mnist"],
}
HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian) or put the four idx .gz files "
    "from github.com/zalandoresearch/fashion-mnist in a folder and set data.root",
    "mnist": "put the four idx files (train-images-idx3-ubyte.gz, ...) from the MNIST site in a folder "
    "and set data.root",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip or raw): big-endian magic 0x0000 TYPE NDIM, dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable idx file: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _find_idx(name: str, stem: str, root: str | None) -> Path:
    dirs = [root] if root else [os.environ.get("VRPO_DATA_ROOT", "")] + SEARCH_DIRS[name]
    looked = []
    for d in dirs:
        if not d:
            continue
        d = Path(d).expanduser()
        for candidate in (d / f"{stem}.gz", d / stem):
            looked.append(str(candidate.parent))
            if candidate.is_file():
                return candidate
    where = ", ".join(dict.fromkeys(looked))
    raise DataError(f"{name} file {stem}(.gz) not found (looked in {where}): {HOW_TO_GET[name]}")


def load_idx_dataset(name: str, split: str, root: str | None = None) -> ImageSet:
    if split not in IDX_FILES:
        raise DataError(f"{name} has splits 'train' and 'test', not {split!r}")
    image_stem, label_stem = IDX_FILES[split]
    images = read_idx(_find_idx(name, image_stem, root))
    labels = read_idx(_find_idx(name, label_stem, root))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{name} {split}: images {images.shape} and labels {labels.shape} do not match")
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # 28 -> 32, black border as in REPA-style MNIST setups
    return ImageSet(
        torch.from_numpy(padded.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), 10, f"{name}:{split}"
    )


def load_digits_dataset(split: str) -> ImageSet:
    """scikit-learn's bundled 8 x 8 digits (1797 images), upsampled to 28 and padded to 32.

    Offline stand-in for MNIST. 'train' is the first 80 %, 'test' the rest, 'all' everything.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).float()[:, None] / 16.0
    up = F.interpolate(pixels, size=(28, 28), mode="bilinear", align_corners=False)
    images = F.pad((up.clamp(0, 1) * 255).round().to(torch.uint8), (2, 2, 2, 2))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    cut = int(0.8 * len(labels))
    parts = {"train": slice(0, cut), "test": slice(cut, None), "all": slice(None)}
    if split not in parts:
        raise DataError(f"digits has splits train, test and all, not {split!r}")
    return ImageSet(images[parts[split]], labels[parts[split]], 10, f"digits:{split}")


# ---------------------------------------------------------------- image folders

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


def center_crop_adm(image, size: int):
    """ADM's center crop: halve with box filter while large, bicubic to size, then crop."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def class_folder_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names) of a folder with one subfolder per class (ImageNet's layout)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class subfolders (expected ROOT/CLASS/IMAGE.png)")
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(index)
    if not paths:
        raise DataError(f"image folder {root} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    return paths, labels, classes


def read_crops(paths: list[Path], resolution: int) -> torch.Tensor:
    """The images at ``paths``, RGB and ADM-cropped to ``resolution``: uint8 [N, 3, R, R]."""
    from PIL import Image

    crops = []
    for path in paths:
        try:
            with Image.open(path) as image:
                crops.append(center_crop_adm(image.convert("RGB"), resolution))
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(root: str | None, resolution: int) -> ImageSet:
    if not root or not Path(root).is_dir():
        raise DataError(f"image folder {root!r} not found: set data.root to a folder with one subfolder per class")
    paths, labels, classes = class_folder_images(Path(root))
    images = read_crops(paths, resolution)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), len(classes), f"folder:{Path(root).name}")


# ---------------------------------------------------------------- pre-encoded tensors


def load_tensor_shards(root: str | None) -> ImageSet:
    """Shards ``*.safetensors`` holding ``images`` ([n, C, H, W], uint8 or float latents) and ``labels``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    shards = sorted(Path(root).glob("*.safetensors")) if root and Path(root).is_dir() else []
    if not shards:
        raise DataError(f"no *.safetensors shards found in {root!r}: set data.root to the folder of shards")
    images, labels = [], []
    for shard in shards:
        try:
            tensors = load_file(str(shard))
        except (SafetensorError, OSError) as err:
            raise DataError(f"shard {shard} is unreadable: {err}") from None
        if "images" not in tensors or "labels" not in tensors:
            raise DataError(f"shard {shard} lacks 'images' or 'labels' (found {sorted(tensors)})")
        images.append(tensors["images"])
        labels.append(tensors["labels"].long())
    labels_all = torch.cat(labels)
    return ImageSet(torch.cat(images), labels_all, int(labels_all.max()) + 1, f"tensors:{Path(root).name}")


# ---------------------------------------------------------------- entry points

DATASETS = ("fashion-mnist", "mnist", "digits", "image-folder", "tensors", "latents")


def load_split(name: str, split: str = "train", root: str | None = None, resolution: int | None = None) -> ImageSet:
    """One split of a named dataset, resized to ``resolution`` when given (pixels only)."""
    if name in ("fashion-mnist", "mnist"):
        data = load_idx_dataset(name, split, root)
    elif name == "digits":
        data = load_digits_dataset(split)
    elif name == "image-folder":
        return load_image_folder(root, resolution or 256)
    elif name == "tensors":
        return load_tensor_shards(root)
    elif name == "latents":  # vrpo prepare-latents' folder, read lazily
        from vrpo.data.latents import LatentSet

        if not root:
            raise DataError("data.name=latents needs data.root: the folder vrpo prepare-latents wrote")
        return LatentSet(root)
    else:
        raise DataError(f"unknown dataset {name!r} (one of {', '.join(DATASETS)})")
    if resolution and resolution != data.resolution:
        resized = F.interpolate(
            data.images.float(), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
        data = ImageSet(resized.round().clamp(0, 255).to(torch.uint8), data.labels, data.num_classes, data.name)
    return data


def balanced_indices(
    labels: torch.Tensor, num_classes: int, limit: int, seed: int, exclude: set[int] | None = None
) -> torch.Tensor:
    """``limit`` row indices (sorted) with classes as equal as possible, chosen by a seeded permutation
    among the rows not in ``exclude``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    per_class = [0] * num_classes
    quota = -(-limit // num_classes)
    chosen = []
    for i in order.tolist():
        if exclude and i in exclude:
            continue
        c = int(labels[i])
        if per_class[c] < quota:
            per_class[c] += 1
            chosen.append(i)
            if len(chosen) == limit:
                break
    return torch.tensor(sorted(chosen))


def balanced_subset(data, limit: int, seed: int, exclude: set[int] | None = None):
    """``limit`` rows of ``data`` (an ImageSet or a latent folder) with classes as equal as possible,
    none of them in ``exclude``."""
    if (limit <= 0 or limit >= len(data)) and not exclude:
        return data
    index = balanced_indices(data.labels, data.num_classes, limit if limit > 0 else len(data), seed, exclude)
    return data.subset(index, f"{data.name}[{limit}@{seed}]")


def model_inputs(data, index: torch.Tensor, device, generator: torch.Generator | None = None):
    """(model-space inputs, uint8 pixels or None) of these rows on ``device``: pixels in [-1, 1], or a
    latent folder's posterior draw (its mean when ``generator`` is None)."""
    latents, pixels = data.batch_rows(index, generator)
    pixels = None if pixels is None else pixels.to(device)
    x = to_model_space(pixels) if latents is None else latents.to(device, torch.float32)
    return x, pixels


def pixel_resolution(cfg) -> int:
    """The side of the images a ``DataConfig``'s encoders see: a latent folder's stored crops, else data.resolution."""
    if cfg.name == "latents" and cfg.root:
        from vrpo.data.latents import manifest_of

        return int(manifest_of(cfg.root)["resolution"])
    return cfg.resolution


def load_dataset(cfg) -> ImageSet:
    """The training set a ``DataConfig`` describes."""
    data = load_split(cfg.name, cfg.split, cfg.root, cfg.resolution)
    if cfg.name == "latents" and cfg.limit:
        raise DataError("data.limit subsets in-memory sets; a latent folder is read whole (prepare a smaller one)")
    if data.resolution != cfg.resolution:
        what = "latents are" if data.is_latent else "images are"
        raise DataError(f"{data.name} {what} {data.resolution} px but data.resolution is {cfg.resolution}")
    return balanced_subset(data, cfg.limit, cfg.data_seed)
