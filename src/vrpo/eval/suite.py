"""The evaluation suite: sample metrics against cached reference statistics, representation
metrics of a trained run, and the FID hook for the training loop.

Sample metrics (FID, sFID, precision/recall, FD in an encoder space) compare uint8 images
with a reference whose statistics are computed once per (images, feature extractor, count)
and kept as fingerprinted .npz files (``vrpo.eval.refstats``); a cache whose fingerprint
differs is refused, never silently used or overwritten. Representation metrics (RA, CKNNA,
linear probe) read the block-d states of a run on noised held-out images.
See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch

from vrpo.data import ImageSet, balanced_subset, load_split
from vrpo.eval.alignment import cknna, linear_probe_accuracy
from vrpo.eval.frechet import feature_statistics, frechet_distance
from vrpo.eval.prdc import precision_recall
from vrpo.eval.refstats import FINGERPRINT_KEY, dataset_fingerprint, load_reference_stats, save_reference_stats
from vrpo.train.logging import append_record

__all__ = [
    "DEFAULT_CACHE_DIR", "EvalError", "FeatureExtractor", "RUN_METRICS", "SAMPLE_METRICS", "append_record",
    "encoder_extractor", "evaluate_during_training", "evaluate_representations", "evaluate_samples",
    "generate_images", "inception_extractor", "load_reference", "metrics_record", "newest_checkpoint_step",
    "read_images", "reference_statistics",
]

DEFAULT_CACHE_DIR = "~/.cache/vrpo/refstats"
DEFAULT_REF_NUM = 10_000
FD_ENCODER_INPUT_SIZE = 224
BUILTIN_SPLITS = ("fashion-mnist", "mnist", "digits")
# Metric -> the feature extractor it needs.
SAMPLE_METRICS = {"fid": "inception", "sfid": "inception", "pr": "inception", "fd_encoder": "encoder"}
RUN_METRICS = ("ra", "cknna", "probe")
CKNNA_K = 10

PathLike = Union[str, Path]


class EvalError(RuntimeError):
    """Bad evaluation input or a refused cache, phrased as one line."""


@dataclass
class FeatureExtractor:
    """Named feature sets of uint8 images [N, C, H, W], with the fingerprint of what made them."""

    name: str  # part of the cached statistics' file name
    info: dict[str, Any]  # goes into the fingerprint; a change makes old caches foreign
    features: Callable[[torch.Tensor], Mapping[str, np.ndarray]]


def inception_extractor(device: str = "cpu", batch_size: int = 64, progress: bool = False) -> FeatureExtractor:
    """FID Inception: ``pool`` (FID, precision/recall) and ``spatial`` (sFID) features."""
    from vrpo.eval.inception import InceptionFeatures, InceptionUnavailableError, feature_extractor_info

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
    from vrpo.encoders import build_encoder
    from vrpo.encoders.cache import cache_slug

    try:
        if weights is None:
            encoder = build_encoder("efficientnet-lite0", input_size=input_size)
        else:
            encoder = build_encoder(name, weights=str(weights), input_size=input_size)
    except (ImportError, OSError, ValueError, KeyError, RuntimeError) as err:
        raise EvalError(f"cannot build the FD encoder: {err}") from None
    encoder = encoder.to(device)

    def features(images: torch.Tensor) -> dict[str, np.ndarray]:
        parts = [encoder(images[i : i + batch_size]).global_.double().cpu().numpy() for i in range(0, len(images), batch_size)]
        return {"global": np.concatenate(parts)}

    info = {"feature_extractor": f"{encoder.name} global", "encoder": encoder.describe()}
    return FeatureExtractor(cache_slug(encoder), info, features)


# ---------------------------------------------------------------- images and references

def _describe(shape: Sequence[int]) -> str:
    c, h, w = shape
    return f"{h}x{w} px with {c} channel{'s' if c != 1 else ''}"


def _read_image_folder(folder: Path) -> torch.Tensor:
    from PIL import Image

    from vrpo.data.datasets import IMAGE_SUFFIXES

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
            raise EvalError(f"{path}: arr_0 is an object array (images of mixed sizes?); expected uint8 N x H x W x C") from None
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

    @property
    def image_shape(self) -> tuple[int, ...]:
        if self.images is not None:
            return tuple(self.images.shape[1:])
        shape = self.stored.get("data_shape")
        if not shape or len(shape) != 4:
            raise EvalError(f"{self.stats_path} does not record its image size (data_shape); cannot check it against the samples")
        return tuple(shape[1:])

    @property
    def num(self) -> int:
        return len(self.images) if self.images is not None else int(self.stored.get("num", self.stored["data_shape"][0]))


def _stored_fingerprint(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files") or FINGERPRINT_KEY not in archive.files:
                return None
            return json.loads(str(archive[FINGERPRINT_KEY][0]))
    except (OSError, ValueError) as err:
        raise EvalError(f"{path} is not a readable npz: {err}") from None


def load_reference(ref: PathLike, num: int = DEFAULT_REF_NUM, data_root: str | None = None) -> Reference:
    """A dataset split ``NAME:SPLIT``, an ADM npz, an image folder, or a statistics file written here."""
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file() and (stored := _stored_fingerprint(path)) is not None:
            return Reference(str(ref), path.stem, None, path, stored)
        images = read_images(path)
        # The path's hash keeps same-named references apart in one cache folder.
        slug = f"{path.stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
        data = ImageSet(images, torch.zeros(len(images), dtype=torch.long), 1, str(path))
    else:
        name, _, split = str(ref).partition(":")
        if not split:
            raise EvalError(f"reference {ref} not found")
        if name not in BUILTIN_SPLITS:
            raise EvalError(f"reference {ref!r} is neither a file nor a dataset split NAME:SPLIT with NAME in {', '.join(BUILTIN_SPLITS)}")
        data = load_split(name, split, data_root)
        slug = f"{name}-{split}"
    data = balanced_subset(data, num, seed=0)
    return Reference(str(ref), f"{slug}-n{len(data)}", data.images)


# ---------------------------------------------------------------- statistics

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


def reference_statistics(reference: Reference, extractor: FeatureExtractor, cache_dir: PathLike = DEFAULT_CACHE_DIR) -> tuple[dict, Path]:
    """Statistics of ``reference`` under ``extractor``: from the cache when its fingerprint matches, else computed and cached."""
    if reference.images is None:
        path, stored = reference.stats_path, reference.stored
        if stored.get("feature_extractor") != extractor.info.get("feature_extractor"):
            raise EvalError(
                f"{path} holds statistics of {stored.get('feature_extractor')!r}, not of {extractor.info.get('feature_extractor')!r}"
            )
        try:  # same images by construction; version, resize or weights may still differ
            return load_reference_stats(path, {**stored, **extractor.info}), path
        except ValueError as err:
            raise _refused(err, path) from None
    fingerprint = {**dataset_fingerprint(reference.images, extractor.info), "num": len(reference.images)}
    path = Path(cache_dir).expanduser() / f"{reference.slug}-{extractor.name}.npz"
    if path.is_file():
        try:
            return load_reference_stats(path, fingerprint), path
        except ValueError as err:
            raise _refused(err, path) from None
    stats = summarize(extractor.features(reference.images))
    save_reference_stats(path, stats, fingerprint)
    return stats, path


def _parse_metrics(metrics: str | Sequence[str], valid: Sequence[str]) -> list[str]:
    from vrpo.eval.inception import INCEPTION_SCORE_UNAVAILABLE_MESSAGE

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


def _finite_or_none(value: float) -> float | None:
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
) -> dict[str, Any]:
    """Sample metrics of uint8 images (a tensor, an ADM npz or an image folder) against ``ref``.

    ``extractors`` maps "inception" / "encoder" to ready extractors (tests inject stubs);
    missing ones are built on demand and added to it, so a caller can keep them loaded.
    """
    from vrpo.eval.inception import INCEPTION_SCORE_UNAVAILABLE_MESSAGE

    start = time.perf_counter()
    metrics = _parse_metrics(metrics, list(SAMPLE_METRICS))
    images = samples if isinstance(samples, torch.Tensor) else read_images(samples)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise EvalError(f"samples must be uint8 [N, C, H, W] with C in (1, 3), got {images.dtype} {tuple(images.shape)}")
    if num is not None:
        if len(images) < num:
            raise EvalError(f"{samples if not isinstance(samples, torch.Tensor) else 'samples'} holds {len(images)} images, fewer than --num {num}")
        images = images[:num]
    reference = load_reference(ref, ref_num, data_root)
    if tuple(images.shape[1:]) != reference.image_shape:
        raise EvalError(
            f"samples are {_describe(images.shape[1:])} but reference {ref} is {_describe(reference.image_shape)}: "
            "use a reference of the samples' size"
        )

    result: dict[str, Any] = {
        "samples": "tensor" if isinstance(samples, torch.Tensor) else str(samples),
        "num_samples": len(images),
        "reference": str(ref),
        "reference_num": reference.num,
    }
    builders = {
        "inception": lambda: inception_extractor(device, batch_size, progress),
        "encoder": lambda: encoder_extractor(encoder_weights, encoder_name, FD_ENCODER_INPUT_SIZE, device, batch_size),
    }
    extractors = {} if extractors is None else extractors
    infos, caches = {}, {}
    for group in dict.fromkeys(SAMPLE_METRICS[m] for m in metrics):
        if group not in extractors:
            extractors[group] = builders[group]()
        extractor = extractors[group]
        ref_stats, caches[group] = reference_statistics(reference, extractor, cache_dir)
        stats = summarize(extractor.features(images))
        infos[group] = extractor.info

        def fd(key: str) -> float:
            return frechet_distance(stats[f"{key}_mu"], stats[f"{key}_sigma"], ref_stats[f"{key}_mu"], ref_stats[f"{key}_sigma"])

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


# ---------------------------------------------------------------- records

def metrics_record(step: int, result: Mapping[str, Any]) -> dict[str, Any]:
    """The flat part of a result (metrics, counts, names) with its step: one metrics.jsonl line."""
    return {"step": int(step), **{k: v for k, v in result.items() if not isinstance(v, (dict, list))}}


def describe_record(record: Mapping[str, Any]) -> str:
    """One console line for an evaluation record."""
    return f"step {record['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))


def newest_checkpoint_step(run_dir: PathLike) -> int | None:
    from vrpo.train.checkpoint import step_dirs

    found = step_dirs(Path(run_dir))
    return int(found[0].name[5:]) if found else None


# ---------------------------------------------------------------- representation metrics

def _noised(objective, cfg, x: torch.Tensor, noise: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and the network's time input: the run's interpolant, or DiT's DDPM at index t (T - 1)."""
    if hasattr(objective, "interpolant"):
        tt = torch.full((x.shape[0],), t, device=x.device)
        return objective.interpolant.sample(x, noise, tt), tt * cfg.transport.time_scale
    index = round(t * (objective.diffusion.num_timesteps - 1))
    return objective.diffusion.q_sample(x, index, noise), torch.full((x.shape[0],), float(index), device=x.device)


@torch.no_grad()
def block_states(model, objective, cfg, images: torch.Tensor, timesteps: Sequence[float], depth: int,
                 align=None, seed: int = 0, batch_size: int = 64) -> tuple[dict, dict]:
    """Mean-pooled block-``depth`` states per timestep [N, D], and RA per timestep when ``align`` is given.

    Labels are the null class: class labels in the input would make the probe trivial.
    Batch b's noise is keyed on (seed, b), the same at every timestep.
    """
    from vrpo.objectives.base import Batch
    from vrpo.utils.images import to_model_space

    device = next(model.parameters()).device
    pooled: dict[float, list] = {t: [] for t in timesteps}
    cosines: dict[float, list] = {t: [] for t in timesteps}
    for start in range(0, len(images), batch_size):
        pixels = images[start : start + batch_size].to(device)
        x = to_model_space(pixels)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start)).to(device)
        # Targets do not depend on t: encode once per batch.
        targets = align.targets(Batch(x, None, pixels, torch.arange(start, start + len(x)))) if align is not None else None
        for t in timesteps:
            x_t, model_t = _noised(objective, cfg, x, noise, t)
            hidden = model(x_t, model_t, None, hidden_layers=(depth,), stop_after=depth).hidden[depth]
            pooled[t].append(hidden.float().mean(dim=1).cpu())
            if targets is not None:
                cosines[t].append(align.cosine(align.project(hidden), targets).double().cpu())
    features = {t: torch.cat(v) for t, v in pooled.items()}
    ra = {t: torch.cat(v).mean().item() for t, v in cosines.items() if v}
    return features, ra


def evaluate_representations(
    run_dir: PathLike,
    metrics: str | Sequence[str] = RUN_METRICS,
    *,
    split: str = "test",
    dataset: str | None = None,
    timesteps: Sequence[float] = (0.25, 0.5, 0.75),
    num: int = 1000,
    probe_train: int | None = None,
    which: str = "ema",
    encoder: FeatureExtractor | None = None,
    encoder_weights: PathLike | None = None,
    encoder_name: str = "dinov2-vitb14",
    encoder_input_size: int = FD_ENCODER_INPUT_SIZE,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """RA, CKNNA (k=10) and linear-probe accuracy of a run's block-d states on noised held-out images.

    RA uses the run's own projector and encoder targets; CKNNA compares with the global
    features of ``encoder`` (default: efficientnet-lite0 at 224, the same for every run so
    that runs are comparable); the probe trains on ``probe_train`` (default ``num``) train images.
    ``dataset`` ("NAME" or "NAME:SPLIT") measures on another dataset than the run's (transfer,
    e.g. "digits:all" for a Fashion-MNIST run); its images are resized to the run's resolution.
    """
    from vrpo.objectives import build_objective
    from vrpo.objectives.alignment import default_encoder_depth
    from vrpo.sample import load_run_model
    from vrpo.train.checkpoint import latest_checkpoint

    start = time.perf_counter()
    metrics = _parse_metrics(metrics, RUN_METRICS)
    if any(not 0.0 <= t <= 1.0 for t in timesteps) or not timesteps:
        raise EvalError(f"timesteps must lie in [0, 1], got {list(timesteps)}")
    cfg, model, step = load_run_model(run_dir, which, device)
    if cfg.data.name == "tensors":
        raise EvalError("representation metrics need pixel images; this run trains on latents (data.name=tensors)")
    name, _, other_split = (dataset or cfg.data.name).partition(":")
    split = other_split or split
    root = cfg.data.root if name == cfg.data.name else None  # a user's copy elsewhere: $VRPO_DATA_ROOT
    held_out = balanced_subset(load_split(name, split, root, cfg.data.resolution), num, seed)
    if held_out.images.shape[1] != model.in_channels:
        raise EvalError(f"{name}:{split} has {held_out.images.shape[1]} channel(s), the run's model takes {model.in_channels}")
    if hasattr(cfg.objective, "feature_cache"):  # held-out images are not in the training cache
        cfg = replace(cfg, objective=replace(cfg.objective, feature_cache=None))
    objective = build_objective(cfg, model, held_out).to(device)
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint.step != step:
        raise EvalError(f"{run_dir} wrote a new checkpoint while loading (step {step} -> {checkpoint.step}); run again")
    objective.load_state_dict(checkpoint.tensors["objective"])
    objective.eval()
    align = getattr(objective, "align", None)
    depth = align.depth if align is not None else default_encoder_depth(model.depth)

    result: dict[str, Any] = {
        "run": str(run_dir), "step": step, "weights": which, "objective": cfg.objective.name,
        "dataset": name, "split": split, "num": len(held_out), "depth": depth, "timesteps": list(timesteps),
    }
    need_ra = "ra" in metrics and align is not None
    features, ra = block_states(model, objective, cfg, held_out.images, timesteps, depth, align if need_ra else None, seed, batch_size)
    if "ra" in metrics:
        if align is None:
            result["ra"] = None
            result.setdefault("unavailable", {})["ra"] = f"objective {cfg.objective.name!r} has no projector to measure RA with"
        else:
            result.update({f"ra@{t:g}": ra[t] for t in timesteps})
            result["ra"] = float(np.mean(list(ra.values())))
    try:
        if "cknna" in metrics:
            encoder = encoder or encoder_extractor(encoder_weights, encoder_name, encoder_input_size, device, batch_size)
            targets = encoder.features(held_out.images)["global"]
            values = {t: cknna(features[t], targets, k=CKNNA_K) for t in timesteps}
            result["cknna_encoder"] = encoder.info.get("feature_extractor")
            result.update({f"cknna@{t:g}": _finite_or_none(v) for t, v in values.items()})
            result["cknna"] = _finite_or_none(float(np.mean(list(values.values()))))
        if "probe" in metrics:
            train = balanced_subset(load_split(name, "train", root, cfg.data.resolution), probe_train or num, seed + 1)
            train_features, _ = block_states(model, objective, cfg, train.images, timesteps, depth, None, seed + 1, batch_size)
            values = {t: linear_probe_accuracy(train_features[t], train.labels, features[t], held_out.labels) for t in timesteps}
            result["probe_train"] = len(train)
            result.update({f"probe@{t:g}": v for t, v in values.items()})
            result["probe"] = float(np.mean(list(values.values())))
    except ValueError as err:
        raise EvalError(str(err)) from None
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# ---------------------------------------------------------------- during training

def run_reference(cfg) -> str:
    """The reference a run's samples are scored against: eval.ref, or its dataset's test split."""
    return cfg.eval.ref or f"{cfg.data.name}:test"


def reference_root(cfg, ref: PathLike) -> str | None:
    """The run's data root serves a reference split of the run's own dataset."""
    return cfg.data.root if str(ref).partition(":")[0] == cfg.data.name else None


@torch.no_grad()
def generate_images(model, cfg, num: int, seed: int = 0, batch_size: int = 64, **sampler_overrides) -> torch.Tensor:
    """``num`` class-balanced uint8 samples [N, C, H, W], noise keyed on (seed, batch) as ``vrpo sample`` keys it."""
    from vrpo.transport import generate
    from vrpo.utils.images import to_uint8

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        noise = torch.randn((n, model.in_channels, model.input_size, model.input_size), generator=generator).to(device)
        labels = (torch.arange(start, start + n) % model.num_classes).to(device) if model.num_classes > 0 else None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            batches.append(to_uint8(generate(model, cfg, labels, noise, generator, **sampler_overrides)).cpu())
    model.train(was_training)
    return torch.cat(batches)


def evaluate_during_training(
    run_dir: PathLike,
    model_or_ema,
    cfg,
    step: int,
    num: int,
    ref: PathLike,
    *,
    metrics: str | Sequence[str] = ("fid",),
    seed: int = 0,
    batch_size: int = 64,
    ref_num: int = DEFAULT_REF_NUM,
    cache_dir: PathLike = DEFAULT_CACHE_DIR,
    extractors: dict[str, FeatureExtractor] | None = None,
    extra: Mapping[str, Any] | None = None,
    **sampler_overrides,
) -> dict[str, Any]:
    """Sample ``num`` images, score them against the cached ``ref`` statistics, append to RUN/metrics.jsonl.

    ``extra`` holds further numbers of this step (e.g. RA) stored in the same record.

    Call on the main rank only. Pass the same ``extractors`` dict (e.g. ``{}``) every time:
    the Inception network built on the first call stays in it. Returns the appended record.
    """
    if cfg.data.name == "tensors":
        raise EvalError("sample metrics need pixels; latent runs would need a decoder first")
    device = str(next(model_or_ema.parameters()).device)
    images = generate_images(model_or_ema, cfg, num, seed, batch_size, **sampler_overrides)
    result = evaluate_samples(images, ref, metrics, ref_num=ref_num, cache_dir=cache_dir, data_root=reference_root(cfg, ref),
                              device=device, batch_size=batch_size, extractors=extractors)
    record = {**metrics_record(step, result), **(extra or {})}
    append_record(Path(run_dir) / "metrics.jsonl", record)
    return record
