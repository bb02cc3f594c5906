"""Sample metrics: FID, sFID, precision/recall and FD in an encoder space, of uint8 images
against a reference whose statistics are cached (``vrpo.eval.references``). See docs/evaluation.md."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vrpo.encoders import build_encoder
from vrpo.encoders.cache import cache_slug
from vrpo.errors import EvalError
from vrpo.eval.frechet import covariance_factor, frechet_distance
from vrpo.eval.inception import (
    INCEPTION_SCORE_UNAVAILABLE_MESSAGE,
    InceptionFeatures,
    InceptionUnavailableError,
    feature_extractor_info,
)
from vrpo.eval.prdc import precision_recall
from vrpo.eval.references import (
    DEFAULT_CACHE_DIR,
    DEFAULT_REF_NUM,
    FeatureExtractor,
    describe_shape,
    load_reference,
    read_images,
    reference_statistics,
    summarize,
)
from vrpo.utils.dist import any_rank, gather_arrays, is_main
from vrpo.utils.types import PathLike

FD_ENCODER_INPUT_SIZE = 224
# Metric -> the feature extractor it needs.
SAMPLE_METRICS = {"fid": "inception", "sfid": "inception", "pr": "inception", "fd_encoder": "encoder"}


def inception_extractor(device: str = "cpu", batch_size: int = 64, progress: bool = False) -> FeatureExtractor:
    """FID Inception: ``pool`` (FID, precision/recall) and ``spatial`` (sFID) features."""
    try:
        network = InceptionFeatures(device=device, batch_size=batch_size, progress=progress)
    except InceptionUnavailableError as err:
        raise EvalError(str(err)) from None
    return FeatureExtractor("inception", feature_extractor_info(), network)


def encoder_extractor(
    weights: PathLike | None = None,
    name: str = "dinov2-vitb14",
    input_size: int = FD_ENCODER_INPUT_SIZE,
    device: str = "cpu",
    batch_size: int = 64,
) -> FeatureExtractor:
    """``global`` features of a frozen encoder: efficientnet-lite0 offline, DINOv2 ``name`` when weights are given."""
    try:
        if weights is None:
            encoder = build_encoder("efficientnet-lite0", input_size=input_size)
        else:
            encoder = build_encoder(name, weights=str(weights), input_size=input_size)
    except (ImportError, OSError, ValueError, KeyError, RuntimeError) as err:
        raise EvalError(f"cannot build the FD encoder: {err}") from None
    encoder = encoder.to(device)

    def features(images: torch.Tensor) -> dict[str, np.ndarray]:
        parts = [
            encoder(images[i : i + batch_size]).global_.double().cpu().numpy()
            for i in range(0, len(images), batch_size)
        ]
        return {"global": np.concatenate(parts)}

    info = {"feature_extractor": f"{encoder.name} global", "encoder": encoder.describe()}
    return FeatureExtractor(cache_slug(encoder), info, features)


def parse_metrics(metrics: str | Sequence[str], valid: Sequence[str]) -> list[str]:
    names = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    names = [m for m in names if m]
    for name in names:
        if name in ("is", "inception_score"):
            raise EvalError(INCEPTION_SCORE_UNAVAILABLE_MESSAGE)
        if name not in valid:
            raise EvalError(f"unknown metric {name!r} here; valid: {', '.join(valid)}")
    if not names:
        raise EvalError(f"no metric asked for; valid: {', '.join(valid)}")
    return names


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate_samples(
    samples: PathLike | torch.Tensor,
    ref: PathLike,
    metrics: str | Sequence[str] = tuple(SAMPLE_METRICS),
    *,
    num: int | None = None,
    ref_num: int = DEFAULT_REF_NUM,
    cache_dir: PathLike = DEFAULT_CACHE_DIR,
    data_root: str | None = None,
    encoder_weights: PathLike | None = None,
    encoder_name: str = "dinov2-vitb14",
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = False,
    extractors: dict[str, FeatureExtractor] | None = None,
    gathered: bool = False,
) -> dict[str, Any]:
    """Sample metrics of uint8 images (a tensor, an ADM npz or an image folder) against ``ref``.

    ``extractors`` maps "inception" / "encoder" to ready extractors (tests inject stubs);
    missing ones are built on demand and added to it, so a caller can keep them loaded.
    ``gathered``: under torchrun every rank passes its own samples, extracts their features, and
    rank 0 scores the features of all (the metrics do not depend on the samples' order); the
    other ranks return {}.
    """
    start = time.perf_counter()
    metrics = parse_metrics(metrics, list(SAMPLE_METRICS))
    images = samples if isinstance(samples, torch.Tensor) else read_images(samples)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise EvalError(
            f"samples must be uint8 [N, C, H, W] with C in (1, 3), got {images.dtype} {tuple(images.shape)}"
        )
    if num is not None:
        if len(images) < num:
            raise EvalError(
                f"{samples if not isinstance(samples, torch.Tensor) else 'samples'} holds {len(images)} images, "
                f"fewer than --num {num}"
            )
        images = images[:num]
    builders = {
        "inception": lambda: inception_extractor(device, batch_size, progress),
        "encoder": lambda: encoder_extractor(encoder_weights, encoder_name, FD_ENCODER_INPUT_SIZE, device, batch_size),
    }
    extractors = {} if extractors is None else extractors
    groups = list(dict.fromkeys(SAMPLE_METRICS[m] for m in metrics))
    for group in groups:
        if group not in extractors:
            extractors[group] = builders[group]()
    main = not gathered or is_main()
    refused = None
    if main:  # a wrong reference or a foreign cache fails before any feature work
        try:
            reference = load_reference(ref, ref_num, data_root)
            if tuple(images.shape[1:]) != reference.image_shape:
                raise EvalError(
                    f"samples are {describe_shape(images.shape[1:])} but reference {ref} is "
                    f"{describe_shape(reference.image_shape)}: use a reference of the samples' size"
                )
            for group in groups:
                reference_statistics(reference, extractors[group], cache_dir, compute=False)
        except EvalError as err:
            refused = err
    if gathered and any_rank(refused is not None, torch.device(device)):  # every rank stops, none waits
        raise refused or EvalError(f"rank 0 refused the reference {ref} (its error names why)")
    if refused is not None:
        raise refused
    # the samples' features before any missing reference statistics: under torchrun the other ranks wait
    features = {group: extractors[group].features(images) if len(images) else {} for group in groups}
    count = len(images)
    if gathered:  # rank 0 holds batch 0: its share is never empty
        features = gather_arrays(features)
        if not main:
            return {}
        count = len(next(iter(features[groups[0]].values())))
    result: dict[str, Any] = {
        "samples": "tensor" if isinstance(samples, torch.Tensor) else str(samples),
        "num_samples": count,
        "reference": str(ref),
        "reference_num": reference.num,
    }
    infos, caches = {}, {}
    for group in groups:
        extractor = extractors[group]
        ref_stats, caches[group] = reference_statistics(reference, extractor, cache_dir)
        stats = summarize(features[group])
        infos[group] = extractor.info

        def fd(key: str, stats=stats, ref_stats=ref_stats, values=features[group]) -> float:
            n, dims = values[key].shape
            factor = covariance_factor(values[key]) if n < dims else None  # few samples: the fast route
            return frechet_distance(
                stats[f"{key}_mu"], stats[f"{key}_sigma"], ref_stats[f"{key}_mu"], ref_stats[f"{key}_sigma"], factor
            )

        try:
            if "fid" in metrics and group == "inception":
                result["fid"] = fd("pool")
            if "sfid" in metrics and group == "inception":
                result["sfid"] = fd("spatial")
            if "pr" in metrics and group == "inception":
                if "pool_features" not in ref_stats:
                    raise EvalError(f"{caches[group]} stores no pool_features: precision/recall cannot use it")
                result.update(precision_recall(ref_stats["pool_features"], stats["pool_features"], k=3))
            if group == "encoder":
                result[f"fd_{extractor.name.split('-')[0]}"] = fd("global")
        except KeyError as err:  # a statistics file written by something else
            raise EvalError(f"{caches[group]} lacks the statistic {err}") from None
        except ValueError as err:
            raise EvalError(f"{group} metrics: {err}") from None
    result["inception_score"] = None
    result["unavailable"] = {"inception_score": INCEPTION_SCORE_UNAVAILABLE_MESSAGE}
    result["feature_extractors"] = infos
    result["reference_stats"] = {group: str(path) for group, path in caches.items()}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def metrics_record(step: int, result: Mapping[str, Any]) -> dict[str, Any]:
    """The flat part of a result (metrics, counts, names) with its step: one metrics.jsonl line."""
    return {"step": int(step), **{k: v for k, v in result.items() if not isinstance(v, (dict, list))}}


def describe_record(record: Mapping[str, Any]) -> str:
    """One console line for an evaluation record."""
    return f"step {record['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
