"""The evaluator the training loop calls: FID (or the configured sample metrics) of the EMA
weights at a step, with held-out RA for alignment methods, appended to RUN/metrics.jsonl.
``evaluate_during_training`` is the same evaluation of any weights (the study's curve points)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vrpo.data import balanced_subset, load_split
from vrpo.errors import EvalError
from vrpo.eval.references import DEFAULT_CACHE_DIR, DEFAULT_REF_NUM, FeatureExtractor
from vrpo.eval.representations import block_states, evaluation_sources
from vrpo.eval.sample_metrics import describe_record, evaluate_samples, metrics_record
from vrpo.runs import append_record
from vrpo.sample import generate_images
from vrpo.utils.dist import is_main, rank_and_world
from vrpo.utils.types import PathLike


def run_reference(cfg) -> str:
    """The reference a run's samples are scored against: eval.ref, or its dataset's test split (a latent
    folder's own stored crops: ImageNet papers score against training images, as ADM's batch holds)."""
    if cfg.eval.ref:
        return cfg.eval.ref
    return str(cfg.data.root) if cfg.data.name == "latents" else f"{cfg.data.name}:test"


def reference_root(cfg, ref: PathLike) -> str | None:
    """The run's data root serves a reference split of the run's own dataset."""
    return cfg.data.root if str(ref).partition(":")[0] == cfg.data.name else None


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

    Under torchrun call it on every rank: each samples its share and extracts its features, rank 0
    scores them all and writes the record (the others return {}). Pass the same ``extractors`` dict
    (e.g. ``{}``) every time: the Inception network built on the first call stays in it. Returns the appended record.
    """
    if cfg.data.name == "tensors":
        raise EvalError("sample metrics during training need pixels: data.name=tensors has no decoder (use latents)")
    device = str(next(model_or_ema.parameters()).device)
    # each rank samples its share and extracts its features; rank 0 scores them all
    images = generate_images(model_or_ema, cfg, num, seed, batch_size, gather=False, **sampler_overrides)
    result = evaluate_samples(
        images,
        ref,
        metrics,
        ref_num=ref_num,
        cache_dir=cache_dir,
        data_root=reference_root(cfg, ref),
        device=device,
        batch_size=batch_size,
        extractors=extractors,
        gathered=rank_and_world()[1] > 1,
    )
    if not is_main():
        return {}
    record = {**metrics_record(step, result), **(extra or {})}
    append_record(Path(run_dir) / "metrics.jsonl", record)
    return record


def evaluate_configured(run_dir, model, cfg, step: int, num: int, metrics, extractors: dict, extra=None) -> dict:
    """``evaluate_during_training`` with the run's own reference, seed and caches (cfg.eval), printed."""
    e = cfg.eval
    record = evaluate_during_training(
        run_dir, model, cfg, step, num, run_reference(cfg), metrics=metrics, seed=e.seed, batch_size=e.batch_size,
        ref_num=e.ref_num, cache_dir=e.cache_dir, extractors=extractors, extra=extra,
    )  # fmt: skip
    if record:
        print(describe_record(record))
    return record


class TrainingEvaluator:
    """The evaluations during a run (sampled and RA measured on every rank, scored on rank 0); keeps its networks and
    held-out images between calls."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.extractors: dict[str, FeatureExtractor] = {}  # loaded on the first evaluation
        self.ra_data = None

    @torch.no_grad()
    def evaluate(self, step: int, ema, objective, model) -> dict:
        """Sample metrics of ``ema`` at ``step`` (the final step may use eval.final_*), and held-out RA
        when the objective aligns (``model``: the network the objective was built for)."""
        e = self.cfg.eval
        extra = {}
        if objective.alignment is not None and e.ra_num:  # spread over the ranks, as the sampling
            extra["ra"] = self.held_out_ra(ema, objective, model)
        final = step == self.cfg.train.max_steps
        num = e.final_num_samples if final and e.final_num_samples else e.num_samples
        metrics = e.final_metrics if final and e.final_metrics else e.metrics
        return evaluate_configured(self.run_dir, ema, self.cfg, step, num, metrics, self.extractors, extra)

    def held_out_ra(self, ema, objective, model, t: float = 0.5) -> float:
        """RA (mean cosine of projected block-d states and encoder tokens) on held-out images at time t."""
        d, e = self.cfg.data, self.cfg.eval
        if self.ra_data is None:
            name, split, root, _ = evaluation_sources(self.cfg, None, "test")
            self.ra_data = balanced_subset(load_split(name, split, root, d.resolution), e.ra_num, e.seed)
            self.ra_alignment = objective.alignment.on_the_fly(self.cfg, model)
        align = self.ra_alignment
        _, ra = block_states(ema, objective.noising, self.ra_data, (t,), align.depth, align, e.seed, e.batch_size)
        return ra[t]
