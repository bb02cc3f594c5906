"""The one training loop every method runs through.

Randomness is keyed on (seed, step, micro-batch, rank) and the data order on (seed, step),
so a run resumed from a checkpoint repeats exactly the steps it would have taken, and two
methods trained with the same seed see the same initial weights, images, timesteps and
noise. The global batch is ``train.batch_size``, split over ranks and accumulation steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vrpo.config import Config, save_config
from vrpo.data import ImageSet, batch_indices, data_position, load_dataset, model_inputs, step_generator
from vrpo.errors import ConfigError, PeerLost
from vrpo.eval.training import TrainingEvaluator
from vrpo.models import DiffusionTransformer, build_model
from vrpo.objectives import Batch, build_objective
from vrpo.runs import latest_checkpoint, load_run_config, read_metrics
from vrpo.runs.checkpoint import (
    Checkpoint,
    agreed_checkpoint,
    clean_temporaries,
    imported_from,
    restore_rng,
    restore_state,
    save_checkpoint,
)
from vrpo.train.ema import ema_decay, make_ema, trainable_state, update_ema, update_ema_tensors
from vrpo.train.logging import RunLogger
from vrpo.train.parallel import make_parallel
from vrpo.train.stopping import StopRequest, TrainingStopped
from vrpo.transport import generate
from vrpo.utils.dist import all_reduce_mean, any_rank, barrier, init_distributed
from vrpo.utils.images import save_grid, to_uint8

# Keys that may change when a run is resumed (with every sampler.* key): they do not affect the weights.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.ckpt_every",
    "train.keep_last",
    "train.log_every",
    "train.sample_every",
    "train.sample_grid",
    "train.progress",
    "train.tensorboard",
    "train.threads",
    "train.activation_checkpointing",
    "train.compile",
    "train.compile_backend",
    "train.parallel",  # a checkpoint loads sharded or whole either way
    "train.grad_accum",  # the same global batch split otherwise (world x accumulation kept: the same draws)
    "train.max_nonfinite",
}  # and every key of the sampler and eval sections


class TrainingDiverged(RuntimeError):
    pass


def lost_peer(err: RuntimeError) -> bool:
    """Whether a collective failed because another rank went away (gloo reports it as a plain
    RuntimeError from the backward's all-reduce, NCCL as a DistError after its timeout)."""
    text = str(err)
    signs = ("Connection reset", "Connection closed", "timed out", "Timed out", "gloo", "NCCL", "ProcessGroup")
    return isinstance(err, torch.distributed.DistError) or any(sign in text for sign in signs)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    skipped_steps: int
    last_loss: float
    samples: Path | None
    loss_curve: Path | None


def lr_at(step: int, cfg) -> float:
    o, total = cfg.optim, cfg.train.max_steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Save the resolved config, or check it against the one the run was started with."""
    path = run_dir / "config.yaml"
    if imported_from(run_dir):  # checked before the config is rewritten: the imported run stays as written
        raise ConfigError(
            f"{run_dir} holds an imported checkpoint without optimizer state: sample or evaluate it (vrpo sample, "
            "vrpo eval); resuming its training is not supported"
        )
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)
        return
    saved_cfg = load_run_config(run_dir)
    if saved_cfg.sampler.noise_keying == "batch":  # a run evaluated before per-sample keying keeps its noise
        cfg.sampler.noise_keying = "batch"
    saved = _flat(saved_cfg.to_dict())
    now = _flat(cfg.to_dict())
    changed = [
        k
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES and not k.startswith(("sampler.", "eval."))
    ]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"{run_dir} was started with another config ({detail}); resume with the same config or use a new --out"
        )
    save_config(cfg, path)  # record the allowed changes (e.g. a longer max_steps)


class TrainStep(torch.nn.Module):
    """Network and objective under one module, so DDP synchronises the heads' gradients too."""

    def __init__(self, model: DiffusionTransformer, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch, generator: torch.Generator):
        out = self.objective.loss(self.model, batch, generator)
        return out.loss, out.logs


def make_batch(data: ImageSet, index: torch.Tensor, device: torch.device, conditional: bool, generator=None) -> Batch:
    """The rows of ``index`` in model space; a latent folder's posterior draws come from ``generator``."""
    x, images = model_inputs(data, index, device, generator)
    labels = data.labels[index].to(device) if conditional else None
    return Batch(x, labels, images, index)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.train
        self.rank, self.world, self.device = init_distributed(t.device, t.dist_timeout_s)
        if t.batch_size % (self.world * t.grad_accum):
            raise ConfigError(
                f"train.batch_size {t.batch_size} is not divisible by world size {self.world} x train.grad_accum "
                f"{t.grad_accum}"
            )
        if t.threads:
            torch.set_num_threads(t.threads)
        self.main = self.rank == 0
        if self.main:
            prepare_run_dir(cfg, self.run_dir)
            clean_temporaries(self.run_dir)
        barrier()
        self.data = load_dataset(cfg.data)
        self.conditional = not cfg.data.unconditional
        num_classes = self.data.num_classes if self.conditional else 0

        unused = cfg.objective.leaves_parameters_unused()  # made before the build: it decides where to build
        self.parallel = make_parallel(t.parallel, self.world, self.device, unused, t.fsdp_precision)
        # Seeded separately so that every method with this seed starts from the same network.
        torch.manual_seed(t.seed)
        self.build_model = lambda: build_model(  # noqa: E731 (also the whole EMA's shape when sharded)
            cfg.model.arch, self.data.resolution, self.data.channels, num_classes, **cfg.model.build_options()
        )
        self.model = self.build_model().to(self.parallel.build_device)  # FSDP2: the host until sharded
        torch.manual_seed(t.seed + 1)
        self.objective = build_objective(cfg, self.model, self.data).to(self.device)
        self.ema = make_ema(self.model)
        self.objective.bind_ema(self.ema)  # restored in place below: the binding stays valid
        # REPA's EMA also averages the projectors (train.ema_heads): their copies, in named_parameters order
        self.ema_heads = trainable_state(self.objective) if t.ema_heads else None
        self.head_params = [p for p in self.objective.parameters() if p.requires_grad]  # in ema_heads' order
        self.params = self.trainable()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=o.fused or None)  # fmt: skip
        self.step, self.skipped, self.consecutive_bad = 0, 0, 0
        shards = self._restore()  # a sharded checkpoint into a sharded run: read after sharding, rank by rank
        self.model.checkpoint_activations = t.activation_checkpointing
        if t.compile:  # block by block, in place: parameter names, checkpoints and the EMA stay as they are
            for block in self.model.blocks:
                block.compile(backend=t.compile_backend)
        self.train_step, self.optimizer = self.parallel.wrap(
            TrainStep(self.model, self.objective), self.model, self.ema, self.optimizer, self.trainable
        )
        self.params = self.trainable()  # sharded now, under FSDP2
        if shards is not None:
            self._load(shards)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        )
        self.logger = RunLogger(self.run_dir, enabled=self.main, tensorboard=t.tensorboard)
        self.warned = self.logger.warned()
        self.evaluator = TrainingEvaluator(cfg, self.run_dir)  # every rank samples its share

    def trainable(self) -> list[torch.nn.Parameter]:
        """The optimizer's parameters, in its order: the network's, then the objective's heads."""
        return [p for p in chain(self.model.parameters(), self.objective.parameters()) if p.requires_grad]

    # ------------------------------------------------------------ checkpoints

    def _restore(self) -> Checkpoint | None:
        """Resume from the newest good checkpoint; one to read after sharding is returned instead."""
        ckpt = agreed_checkpoint(self.run_dir)  # rank 0 verifies (and moves damaged ones aside)
        if ckpt is None:
            return None
        if ckpt.meta.get("data_fingerprint") != self.data.fingerprint:
            raise ConfigError(
                f"the training data changed since {ckpt.path} was written (fingerprint "
                f"{ckpt.meta.get('data_fingerprint')} -> {self.data.fingerprint}): resuming would not repeat the "
                "same steps; use a new --out"
            )
        if not (later := ckpt.sharded and self.parallel.sharded):
            self._load(ckpt)
        restore_rng(ckpt.rng(), ckpt.meta["rng"])
        self.step = ckpt.step
        self.skipped = ckpt.meta["skipped_steps"]
        self.consecutive_bad = ckpt.meta["consecutive_nonfinite"]
        if self.main:
            print(f"resuming {self.run_dir} from step {self.step} ({ckpt.path.name})")
        return ckpt if later else None

    def _load(self, ckpt: Checkpoint) -> None:
        modules = {"model": self.model, "ema": self.ema, "objective": self.objective}
        restore_state(ckpt, modules, self.ema_heads, self.optimizer, shards=ckpt.sharded and self.parallel.sharded)

    def save(self) -> None:
        if self.main or self.parallel.sharded:  # sharded: every rank writes its shards
            meta = {
                "skipped_steps": self.skipped,
                "consecutive_nonfinite": self.consecutive_bad,
                "data": data_position(self.step, self.cfg.train.batch_size, len(self.data)),
                "data_fingerprint": self.data.fingerprint,
                "saved_at": time.time(),
            }
            save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                self.ema,
                self.objective,
                self.optimizer,
                meta,
                self.cfg.train.keep_last,
                extra={"ema_heads": self.ema_heads} if self.ema_heads is not None else None,
                sharded=self.parallel.sharded,
            )
        barrier()

    # ------------------------------------------------------------ one step

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        t = self.cfg.train
        index = batch_indices(step, t.batch_size, len(self.data), t.seed)
        per_rank = index.view(self.world, -1)[self.rank]
        return list(per_rank.view(t.grad_accum, -1))

    def train_one_step(self) -> dict:
        t, step = self.cfg.train, self.step
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.start_of_step(step)
        micro = self._micro_batches(step)
        logs: dict[str, torch.Tensor] = {}
        for m, index in enumerate(micro):
            # Keyed on the micro-batch's place in the global batch: W ranks x A micro-batches
            # draw what one process with W x A accumulation steps would.
            generator = step_generator(t.seed, step, self.rank * len(micro) + m)
            batch = make_batch(self.data, index, self.device, self.conditional, generator)
            with self.parallel.no_sync(self.train_step, last=m == len(micro) - 1):
                with self.autocast():
                    loss, step_logs = self.train_step(batch, generator)
                (loss / len(micro)).backward()
            for k, v in {"loss": loss, **step_logs}.items():
                logs[k] = logs.get(k, 0.0) + torch.as_tensor(v, device=self.device).detach().float() / len(micro)
        # One reduction for every logged number: the log shows the global batch, not rank 0's share.
        names = list(logs)
        values = all_reduce_mean(torch.stack([logs[k] for k in names])).tolist()
        logs = dict(zip(names, values))
        self.parallel.reduce_head_gradients(self.head_params)
        clip = t_clip if (t_clip := self.cfg.optim.grad_clip) > 0 else float("inf")
        grad_norm = self.parallel.clip_gradients(self.params, clip)
        finite = math.isfinite(logs["loss"]) and bool(torch.isfinite(grad_norm))
        if any_rank(not finite, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive_bad += 1
            self.objective.end_of_step(step, applied=False)
        else:
            self.optimizer.step()
            decay = ema_decay(step, t.ema_decay, t.ema_warmup)
            update_ema(self.ema, self.model, decay)
            if self.ema_heads is not None:
                update_ema_tensors(list(self.ema_heads.values()), self.head_params, decay)
            self.consecutive_bad = 0
            self.objective.end_of_step(step, applied=True)
        self.step += 1
        return {**logs, "grad_norm": float(grad_norm), "lr": lr}

    # ------------------------------------------------------------ samples

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        ema = self.parallel.whole(self.ema, self.build_model)  # every rank: a gather when sharded
        if not self.main:
            return None
        t, d = self.cfg.train, self.data
        gen = torch.Generator().manual_seed(t.seed + 0x5EED)  # the same noise at every step
        shape = (t.sample_grid, self.model.in_channels, d.resolution, d.resolution)  # ReDi's channels too
        noise = torch.randn(shape, generator=gen).to(self.device)
        labels = (torch.arange(t.sample_grid) % d.num_classes).to(self.device) if self.conditional else None
        with self.autocast():
            x = generate(ema, self.cfg, labels, noise, gen)
        if d.is_latent:
            return None  # latents need a decoder to become pictures
        return save_grid(
            to_uint8(x),
            self.run_dir / "samples" / f"step_{self.step:08d}.png",
            nrow=d.num_classes if self.conditional and t.sample_grid % d.num_classes == 0 else None,
        )

    # ------------------------------------------------------------ evaluation

    def eval_due(self) -> bool:
        every = self.cfg.eval.every
        return every > 0 and (self.step % every == 0 or self.step == self.cfg.train.max_steps)

    def evaluate(self) -> dict:
        """The configured evaluation of the EMA weights at this step, into RUN/metrics.jsonl: every
        rank samples its share, rank 0 scores and writes (the others get {})."""
        ema = self.parallel.whole(self.ema, self.build_model)  # sharded: a whole copy, gathered on every rank
        network = ema if self.parallel.sharded else self.model  # the network the objective's heads fit
        return self.evaluator.evaluate(self.step, ema, self.objective, network)

    def report_warnings(self, record: dict[str, float]) -> None:
        """The objective's known failure modes, each printed and logged (rank 0) once per run."""
        if not self.main:
            return
        for key, message in self.objective.warnings(record).items():
            if key not in self.warned:
                self.warned.add(key)
                print(f"WARNING at step {self.step}: {message}", file=sys.stderr, flush=True)
                self.logger.warn(self.step, key, message)

    # ------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        t = self.cfg.train
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not (self.main and t.progress),
            dynamic_ncols=True,
            desc="train",
        )
        # the run was stopped between its checkpoint and its evaluation: rank 0's file decides for all
        if any_rank(self.main and self.step > 0 and self.eval_due() and self.step not in read_metrics(self.run_dir),
                    self.device):  # fmt: skip
            self.evaluate()
        with StopRequest() as stop:
            try:
                last = self._steps(bar, stop)
            except RuntimeError as err:  # a rank died or hung: fail in one line, never hang
                if self.world == 1 or not lost_peer(err):
                    raise
                good = latest_checkpoint(self.run_dir)
                raise PeerLost(
                    f"rank {self.rank} of {self.world}: a collective failed at step {self.step} (another rank died "
                    f"or hung beyond train.dist_timeout_s={t.dist_timeout_s:g}: {str(err).splitlines()[0][:160]}); "
                    f"newest complete checkpoint: {good.path if good else 'none'}; rerun the command to resume"
                ) from None
        bar.close()
        samples = self.sample_grid()
        curve = self.logger.plot_loss(self.run_dir / "loss_curve.png") if self.main else None
        if self.main:
            self.objective.finalize(self.run_dir)
        self.logger.close()
        return TrainResult(self.run_dir, self.step, self.skipped, last["loss"], samples, curve)

    def _steps(self, bar, stop: StopRequest) -> dict[str, float]:
        """Train up to max_steps (logging, checkpoints, evaluations); stop cleanly on a signal."""
        t = self.cfg.train
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        last = {"loss": float("nan")}
        while self.step < t.max_steps:
            last = self.train_one_step()
            if self.consecutive_bad >= t.max_nonfinite:
                good = latest_checkpoint(self.run_dir)
                where = good.path if good else "none (no checkpoint was written yet)"
                raise TrainingDiverged(
                    f"training stopped at step {self.step}: {self.consecutive_bad} consecutive steps with a non-finite "
                    f"loss or gradient (loss={last['loss']}, grad_norm={last['grad_norm']}); last good checkpoint: "
                    f"{where}"
                )
            for k, v in last.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {k: v / window_steps for k, v in window.items()}
                record.update(images_per_s=window_steps * t.batch_size / elapsed, skipped_steps=self.skipped)
                self.logger.log(self.step, record)
                self.report_warnings(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)
                window, window_steps, window_start = {}, 0, time.perf_counter()
            saved = self.step % t.ckpt_every == 0 or self.step == t.max_steps or self.eval_due()
            if saved:
                self.save()
            if any_rank(stop.signum is not None, self.device):  # before a long evaluation: a rerun does it
                if not saved:
                    self.save()
                name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                raise TrainingStopped(
                    f"stopped by {name} at step {self.step}: checkpoint written; rerun the same command to resume",
                    stop.signum or signal.SIGTERM,
                )
            if self.eval_due():
                self.evaluate()
            if t.sample_every and self.step % t.sample_every == 0 and self.step != t.max_steps:
                self.sample_grid()
        return last


def train(cfg: Config, run_dir: str | Path) -> TrainResult:
    return Trainer(cfg, run_dir).fit()
