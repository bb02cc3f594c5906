"""Representation metrics of a run: RA, CKNNA and a linear probe on its block-d states of
noised held-out images (in-domain, or another dataset for transfer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vrpo.data import balanced_subset, keyed_generator, load_split, model_inputs
from vrpo.data.datasets import balanced_indices
from vrpo.errors import EvalError
from vrpo.eval.alignment import cknna, linear_probe_accuracy
from vrpo.eval.references import FeatureExtractor
from vrpo.eval.sample_metrics import FD_ENCODER_INPUT_SIZE, encoder_extractor, finite_or_none, parse_metrics
from vrpo.objectives import Batch, build_objective
from vrpo.objectives.alignment import default_encoder_depth
from vrpo.runs import latest_checkpoint, load_run_model
from vrpo.sample import rank_batches
from vrpo.utils.dist import gather_mapping, rank_and_world
from vrpo.utils.types import PathLike

RUN_METRICS = ("ra", "cknna", "probe")
CKNNA_K = 10


@torch.no_grad()
def block_states(
    model,
    noising,
    data,
    timesteps: Sequence[float],
    depth: int,
    align=None,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict, dict]:
    """Mean-pooled block-``depth`` states per timestep [N, D] of the rows of ``data`` (pixels, or a latent
    folder's posterior means), and RA per timestep when ``align`` is given.

    ``noising`` is the run's forward process (its objective's); ``t`` is the fraction of the way
    from data to noise. Labels are the null class: class labels in the input would make the
    probe trivial. Batch b's noise is keyed on (seed, b), the same at every timestep. A network
    with a global token (REG) gets it as pure noise; ReDi's representation channels are zero.
    Under torchrun call it on every rank: batch b runs on rank b % world, every rank gets all the results.
    """
    device = next(model.parameters()).device
    mine = {}  # batch start -> (pooled per t, cosines per t)
    for start in rank_batches(len(data), batch_size):  # the sampler's split of batches over ranks
        index = torch.arange(start, min(start + batch_size, len(data)))
        x, pixels = model_inputs(data, index, device)
        if model.representation_channels:  # ReDi's channels absent (zero), as its dropout trains them
            x = torch.cat([x, x.new_zeros(x.shape[0], model.representation_channels, *x.shape[2:])], dim=1)
        generator = keyed_generator(seed, start)
        noise = torch.randn(x.shape, generator=generator).to(device)
        # REG's global token enters as pure noise: it carries no information and the probe reads the image
        token = None
        if model.global_token_dim:
            token = torch.randn((x.shape[0], model.global_token_dim), generator=generator).to(device)
        # Targets do not depend on t: encode once per batch.
        targets = align.targets(Batch(x, None, pixels, index)) if align is not None else None
        pooled, cosines = {}, {}
        for t in timesteps:
            times = noising.fixed_times(t, x.shape[0], device)
            x_t = noising.add_noise(x, noise, times)
            out = model(
                x_t, noising.model_time(times), None, hidden_layers=(depth,), stop_after=depth, global_token=token
            )
            hidden = out.hidden[depth]
            pooled[t] = hidden.float().mean(dim=1).cpu()
            if targets is not None:
                cosines[t] = align.cosine(align.project(hidden), targets).double().cpu()
        mine[start] = (pooled, cosines)
    batches = [part for _, part in sorted(gather_mapping(mine, everywhere=True).items())]
    features = {t: torch.cat([pooled[t] for pooled, _ in batches]) for t in timesteps}
    ra = {t: torch.cat([cosines[t] for _, cosines in batches]).mean().item() for t in timesteps if align is not None}
    return features, ra


def encoder_features_over_ranks(encoder: FeatureExtractor, data) -> np.ndarray:
    """``encoder``'s global features [N, D] of ``data``'s pixels; under torchrun each rank encodes a
    contiguous share of the rows and every rank gets them all, in row order."""
    rank, world = rank_and_world()
    rows = np.array_split(np.arange(len(data)), world)[rank]
    share = data.subset(torch.from_numpy(rows), f"{data.name}[rank {rank}]")
    mine = encoder.features(share.pixels())["global"] if len(rows) else None
    parts = gather_mapping({rank: mine}, everywhere=True)
    return np.concatenate([parts[r] for r in sorted(parts) if parts[r] is not None])


def evaluation_sources(cfg, dataset: str | None, split: str) -> tuple[str, str, str | None, str | None]:
    """(name, split, root of the measured split, root of the probe's train split) of a run's evaluation.
    A latent folder has no splits: ``dataset`` or ``eval.held_out`` names a second prepared folder
    (e.g. ImageNet's validation images); without one the run's own folder is measured."""
    if cfg.data.name == "tensors":
        raise EvalError("representation metrics need pixel images: data.name=tensors holds latents without them")
    if cfg.data.name == "latents":
        held_out = dataset or cfg.eval.held_out or cfg.data.root
        own = Path(held_out).resolve() == Path(cfg.data.root).resolve()
        return "latents", "train" if own else "held-out", held_out, cfg.data.root
    name, _, other_split = (dataset or cfg.data.name).partition(":")
    root = cfg.data.root if name == cfg.data.name else None  # a user's copy elsewhere: $VRPO_DATA_ROOT
    return name, other_split or split, root, root


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
    start = time.perf_counter()
    metrics = parse_metrics(metrics, RUN_METRICS)
    if any(not 0.0 <= t <= 1.0 for t in timesteps) or not timesteps:
        raise EvalError(f"timesteps must lie in [0, 1], got {list(timesteps)}")
    cfg, model, step = load_run_model(run_dir, which, device)
    name, split, root, train_root = evaluation_sources(cfg, dataset, split)
    source = load_split(name, split, root, cfg.data.resolution)
    held_rows = balanced_indices(source.labels, source.num_classes, num, seed) if 0 < num < len(source) else None
    held_out = source if held_rows is None else source.subset(held_rows, f"{source.name}[{num}@{seed}]")
    if held_out.channels != model.image_channels:
        raise EvalError(
            f"{name}:{split} has {held_out.channels} channel(s), the run's model takes {model.image_channels}"
        )
    cfg = replace(cfg, objective=cfg.objective.without_feature_cache())  # held-out images are not in the training cache
    objective = build_objective(cfg, model, held_out).to(device)
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint.step != step:
        raise EvalError(f"{run_dir} wrote a new checkpoint while loading (step {step} -> {checkpoint.step}); run again")
    state = dict(checkpoint.tensors["objective"])
    if which == "ema" and "ema_heads" in checkpoint.tensors:  # train.ema_heads: the EMA of the projectors too
        state.update(checkpoint.tensors["ema_heads"])
    objective.load_state_dict(state)
    objective.eval()
    align = objective.alignment
    depth = align.depth if align is not None else default_encoder_depth(model.depth)

    result: dict[str, Any] = {
        "run": str(run_dir),
        "step": step,
        "weights": which,
        "objective": cfg.objective.name,
        "dataset": name,
        "split": split,
        "num": len(held_out),
        "depth": depth,
        "timesteps": list(timesteps),
    }
    need_ra = "ra" in metrics and align is not None
    features, ra = block_states(
        model, objective.noising, held_out, timesteps, depth, align if need_ra else None, seed, batch_size
    )
    if "ra" in metrics:
        if align is None:
            result["ra"] = None
            result.setdefault("unavailable", {})["ra"] = (
                f"objective {cfg.objective.name!r} has no projector to measure RA with"
            )
        else:
            result.update({f"ra@{t:g}": ra[t] for t in timesteps})
            result["ra"] = float(np.mean(list(ra.values())))
    try:
        if "cknna" in metrics:
            encoder = encoder or encoder_extractor(
                encoder_weights, encoder_name, encoder_input_size, device, batch_size
            )
            targets = encoder_features_over_ranks(encoder, held_out)
            values = {t: cknna(features[t], targets, k=CKNNA_K) for t in timesteps}
            result["cknna_encoder"] = encoder.info.get("feature_extractor")
            result.update({f"cknna@{t:g}": finite_or_none(v) for t, v in values.items()})
            result["cknna"] = finite_or_none(float(np.mean(list(values.values()))))
        if "probe" in metrics:
            train_set = load_split(name, "train", train_root, cfg.data.resolution)
            # measured on training rows (a latent folder without a held-out one): the probe trains on the others
            same_rows = split == "train" and str(Path(root or "").resolve()) == str(Path(train_root or "").resolve())
            if same_rows and held_rows is None:
                raise EvalError(f"the probe needs training rows besides the {len(held_out)} measured: lower --num")
            exclude = set(held_rows.tolist()) if same_rows else None
            train = balanced_subset(train_set, probe_train or num, seed + 1, exclude)
            train_features, _ = block_states(
                model, objective.noising, train, timesteps, depth, None, seed + 1, batch_size
            )
            values = {
                t: linear_probe_accuracy(train_features[t], train.labels, features[t], held_out.labels)
                for t in timesteps
            }
            result["probe_train"] = len(train)
            result.update({f"probe@{t:g}": v for t, v in values.items()})
            result["probe"] = float(np.mean(list(values.values())))
    except ValueError as err:
        raise EvalError(str(err)) from None
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
