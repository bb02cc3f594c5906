"""References for sample metrics: images read from an npz, a folder or a dataset split, and
their feature statistics, computed once per (images, feature extractor, count) and kept as
fingerprinted .npz files (``vrpo.eval.refstats``); a cache whose fingerprint differs is
refused, never silently used or overwritten."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vrpo.data import ImageSet, balanced_subset, load_split
from vrpo.data.datasets import IMAGE_SUFFIXES
from vrpo.data.latents import LatentSet, is_latent_folder
from vrpo.errors import EvalError
from vrpo.eval.frechet import feature_statistics
from vrpo.eval.refstats import FINGERPRINT_KEY, dataset_fingerprint, load_reference_stats, save_reference_stats
from vrpo.utils.types import PathLike

DEFAULT_CACHE_DIR = "~/.cache/vrpo/refstats"
DEFAULT_REF_NUM = 10_000
BUILTIN_SPLITS = ("fashion-mnist", "mnist", "digits")


@dataclass
class FeatureExtractor:
    """Named feature sets of uint8 images [N, C, H, W], with the fingerprint of what made them."""

    name: str  # part of the cached statistics' file name
    info: dict[str, Any]  # goes into the fingerprint; a change makes old caches foreign
    features: Callable[[torch.Tensor], Mapping[str, np.ndarray]]


def describe_shape(shape: Sequence[int]) -> str:
    c, h, w = shape
    return f"{h}x{w} px with {c} channel{'s' if c != 1 else ''}"


def _read_image_folder(folder: Path) -> torch.Tensor:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise EvalError(f"{folder} holds no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                gray = image.mode in ("1", "L", "I", "I;16", "F")
                arrays.append(np.asarray(image.convert("L" if gray else "RGB")))
        except OSError as err:
            raise EvalError(f"cannot read image {path}: {err}") from None
    if any(a.ndim == 3 for a in arrays):  # some colour: grayscale ones join as RGB
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    sizes = Counter(a.shape[:2] for a in arrays)
    if len(sizes) > 1:
        listed = ", ".join(f"{n} of {h}x{w}" for (h, w), n in sizes.most_common())
        raise EvalError(f"{folder} holds images of mixed sizes ({listed}); every image must have the same size")
    stacked = np.stack(arrays)
    return torch.from_numpy(stacked[..., None] if stacked.ndim == 3 else stacked).permute(0, 3, 1, 2).contiguous()


def read_images(path: PathLike) -> torch.Tensor:
    """uint8 [N, C, H, W] from an ADM npz (``arr_0``: uint8 N x H x W x C) or a folder of image files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EvalError(f"{path} not found")
    if path.is_dir():
        return _read_image_folder(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files") or "arr_0" not in archive.files:
                raise EvalError(f"{path} has no arr_0: expected an ADM-style npz of uint8 N x H x W x C images")
            array = archive["arr_0"]
    except ValueError as err:
        if "Object arrays" in str(err):  # a list of differently sized images
            raise EvalError(
                f"{path}: arr_0 is an object array (images of mixed sizes?); expected uint8 N x H x W x C"
            ) from None
        raise EvalError(f"{path} is not a readable npz: {err}") from None
    except OSError as err:
        raise EvalError(f"{path} is not a readable npz: {err}") from None
    if array.ndim == 3:  # N x H x W: grayscale without a channel axis
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise EvalError(f"{path}: arr_0 is {array.dtype} {array.shape}; expected uint8 N x H x W x C with C in (1, 3)")
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


@dataclass
class Reference:
    """Reference images (subset of ``num``) or, for a statistics file, its stored fingerprint."""

    label: str
    slug: str  # cache file-name stem
    images: torch.Tensor | None
    stats_path: Path | None = None
    stored: dict | None = None
    # a latent folder's rows: their crops are read only to compute statistics, the manifest identifies them
    latent_rows: Any = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        if self.images is not None:
            return tuple(self.images.shape[1:])
        if self.latent_rows is not None:
            return tuple(self.latent_rows.shards.image_shape)
        shape = self.stored.get("data_shape")
        if not shape or len(shape) != 4:
            raise EvalError(
                f"{self.stats_path} does not record its image size (data_shape); cannot check it against the samples"
            )
        return tuple(shape[1:])

    @property
    def num(self) -> int:
        if self.images is not None:
            return len(self.images)
        if self.latent_rows is not None:
            return len(self.latent_rows)
        return int(self.stored.get("num", self.stored["data_shape"][0]))

    def fingerprint(self, extractor_info: Mapping[str, Any]) -> dict:
        """What its statistics are checked against: the images' bytes, or a latent folder's manifest and rows."""
        if self.latent_rows is None:
            return {**dataset_fingerprint(self.images, extractor_info), "num": len(self.images)}
        digest = hashlib.sha256(self.latent_rows.fingerprint.encode()).hexdigest()
        shape = [len(self.latent_rows), *self.image_shape]
        return {"latent_rows_sha256": digest, "data_shape": shape, **dict(extractor_info), "num": len(self.latent_rows)}

    def pixels(self) -> torch.Tensor:
        return self.images if self.latent_rows is None else self.latent_rows.pixels()


def _stored_fingerprint(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files") or FINGERPRINT_KEY not in archive.files:
                return None
            return json.loads(str(archive[FINGERPRINT_KEY][0]))
    except (OSError, ValueError) as err:
        raise EvalError(f"{path} is not a readable npz: {err}") from None


def load_reference(ref: PathLike, num: int = DEFAULT_REF_NUM, data_root: str | None = None) -> Reference:
    """A dataset split ``NAME:SPLIT``, an ADM npz, an image folder, a latent folder (its stored crops), or a
    statistics file written here."""
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file() and (stored := _stored_fingerprint(path)) is not None:
            return Reference(str(ref), path.stem, None, path, stored)
        # The path's hash keeps same-named references apart in one cache folder.
        slug = f"{path.stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
        if is_latent_folder(path):  # its stored crops, class-balanced, read only when the statistics are computed
            data = balanced_subset(LatentSet(path), num, seed=0)
            return Reference(str(ref), f"{slug}-rows-n{len(data)}", None, latent_rows=data)
        images = read_images(path)
        data = ImageSet(images, torch.zeros(len(images), dtype=torch.long), 1, str(path))
    else:
        name, _, split = str(ref).partition(":")
        if not split:
            raise EvalError(f"reference {ref} not found")
        if name not in BUILTIN_SPLITS:
            raise EvalError(
                f"reference {ref!r} is neither a file nor a dataset split NAME:SPLIT with NAME in "
                f"{', '.join(BUILTIN_SPLITS)}"
            )
        data = load_split(name, split, data_root)
        slug = f"{name}-{split}"
    data = balanced_subset(data, num, seed=0)
    return Reference(str(ref), f"{slug}-n{len(data)}", data.images)


def summarize(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean and covariance of every feature set, plus the pool features that precision/recall needs."""
    stats = {}
    for key, values in features.items():
        try:
            stats[f"{key}_mu"], stats[f"{key}_sigma"] = feature_statistics(values)
        except ValueError as err:
            raise EvalError(f"{key} features: {err}") from None
    if "pool" in features:
        stats["pool_features"] = np.asarray(features["pool"], dtype=np.float32)
    return stats


def _refused(err: Exception, path: Path) -> EvalError:
    return EvalError(f"{err} (delete {path} or use another --cache-dir)")


def reference_statistics(
    reference: Reference, extractor: FeatureExtractor, cache_dir: PathLike = DEFAULT_CACHE_DIR, compute: bool = True
) -> tuple[dict | None, Path]:
    """Statistics of ``reference`` under ``extractor``: from the cache when its fingerprint matches,
    else computed and cached (``compute=False``: None, a cheap check of what is cached)."""
    if reference.stats_path is not None:
        path, stored = reference.stats_path, reference.stored
        if stored.get("feature_extractor") != extractor.info.get("feature_extractor"):
            raise EvalError(
                f"{path} holds statistics of {stored.get('feature_extractor')!r}, not of "
                f"{extractor.info.get('feature_extractor')!r}"
            )
        try:  # same images by construction; version, resize or weights may still differ
            return load_reference_stats(path, {**stored, **extractor.info}), path
        except ValueError as err:
            raise _refused(err, path) from None
    fingerprint = reference.fingerprint(extractor.info)
    path = Path(cache_dir).expanduser() / f"{reference.slug}-{extractor.name}.npz"
    if path.is_file():
        try:
            return load_reference_stats(path, fingerprint), path
        except ValueError as err:
            raise _refused(err, path) from None
    if not compute:
        return None, path
    stats = summarize(extractor.features(reference.pixels()))
    save_reference_stats(path, stats, fingerprint)
    return stats, path
