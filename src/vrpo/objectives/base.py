"""The contract every training method implements, and all that callers may rely on.

An objective is an ``nn.Module``: its trainable heads (projectors) and running statistics
(VRPO's reward EMAs) are its parameters and buffers, so they are optimised, checkpointed
and synchronised with the network. What a caller may ask of it:

- ``Options``: its config section (a dataclass). ``families`` lists the model families it
  trains (``flow`` for SiT-*, ``ddpm`` for DiT-*); ``encoder_names`` / ``build_encoders`` the frozen encoders it reads
  and ``cache_root`` where their feature cache lives; ``without_feature_cache`` the same
  options encoding on the fly (held-out images are not in a training cache);
  ``alignment_coefficients(record)`` what multiplies each alignment term of the loss in a
  logged training record (the effective coefficient a comparison reports beside a gain);
  ``alignment_schedule(record)`` the adaptive quantities that coefficient is made of (VRPO's
  lambda_s and reward weights), for the report's plot of them over training;
  ``from_saved`` reads a run folder's saved section written by an earlier version;
  ``model_defaults`` the network variant it needs (REG's global token).
- ``noising`` (and ``family``): the forward process it trains on, from the config's model
  family; ``denoise`` runs one noised pass through it, which every method builds on.
- ``alignment``: its encoder targets and projectors (``AlignmentTargets``), or None.
- ``hidden_layers()``: the blocks whose outputs its loss reads; ``attention_layers()`` those whose
  attention logits it reads (HASTE's term).
- ``loss(model, batch, generator)``: the scalar to minimise and the numbers to log. All
  randomness comes from ``generator``, which the loop keys on (seed, step, micro-batch),
  so runs resume exactly and methods with one seed are paired.
- ``bind_ema(ema)``: the loop hands every objective its EMA network once (SRA's teacher);
  an objective keeps it out of its module tree, so it is neither optimised nor checkpointed.
- hooks: ``start_of_step(step)`` before every optimizer step (``self.step``: the step being
  taken, for schedules; set from the loop's counter, so a resumed run has it too),
  ``end_of_step`` after every optimizer step, ``warnings`` on every logged record,
  ``finalize`` at the end of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from vrpo.transport.noising import build_noising


@dataclass
class ObjectiveOptions:
    name: str = "sit"
    families: ClassVar[tuple[str, ...]] = ("flow", "ddpm")

    def validate(self, cfg) -> None:
        """Refuse combinations with the rest of the config that cannot work (ConfigError)."""

    def encoder_names(self) -> list[str]:
        """Names of the frozen encoders this method reads (none by default)."""
        return []

    def build_encoders(self, resolution: int) -> list:
        """Those encoders, built now."""
        return []

    def cache_root(self) -> str | None:
        """The folder of the encoders' feature cache, None when they encode on the fly."""
        return None

    def without_feature_cache(self) -> ObjectiveOptions:
        return self

    @classmethod
    def from_saved(cls, section: dict) -> dict:
        """A run folder's saved section, perhaps written by an earlier version of the method, in the
        keys that keep its meaning today (a saved config is resolved: every key it had then is there)."""
        return section

    def model_defaults(self, arch: str) -> dict:
        """Options of the config's model section this method needs for ``arch`` (REG: the global
        token's width; DeepFlow: its branches), applied where the config leaves them at their defaults."""
        return {}

    def leaves_parameters_unused(self) -> bool:
        """True when some steps give a trainable head no gradient (DDP must then look for them)."""
        return False

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        """{alignment term: the coefficient on it in the loss} for one record of the training log;
        {} for a method that aligns nothing (or a record that does not say)."""
        return {}

    def alignment_schedule(self, record: dict[str, float]) -> dict[str, float]:
        """{name: value} of what the method adapts during training to make its coefficients (a
        scale, per-term weights) in one logged record; {} where they are fixed."""
        return {}


@dataclass
class Batch:
    x: torch.Tensor  # model-space inputs, float (pixels in [-1, 1] or latents)
    labels: torch.Tensor | None  # int64 class labels, None when unconditional
    images: torch.Tensor | None  # uint8 pixels [B, C, H, W] for encoders (None for latents)
    index: torch.Tensor  # dataset indices, for feature-cache look-ups


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class DenoisingStep:
    """One noised batch and the network's pass over it, shared by every method."""

    t: torch.Tensor  # [B] the family's times
    model_t: torch.Tensor  # [B] the network's time input
    noise: torch.Tensor
    x_t: torch.Tensor
    labels: torch.Tensor | None  # after label dropout
    prediction: torch.Tensor
    hidden: dict[int, torch.Tensor]
    per_sample_loss: torch.Tensor  # [B] the family's denoising loss per sample
    parts: dict[str, torch.Tensor]  # its named per-sample parts (flow: denoise; ddpm: mse, vb)
    # REG: the clean global token, its noise, it noised at the same t, and its own denoising loss [B]
    global_token: torch.Tensor | None = None
    global_noise: torch.Tensor | None = None
    global_t: torch.Tensor | None = None
    global_loss: torch.Tensor | None = None
    hidden_global: dict[int, torch.Tensor] = field(default_factory=dict)
    output: object = None  # the network's whole ModelOutput (DeepFlow's branch heads)

    def logs(self) -> dict[str, torch.Tensor]:
        logs = {f"loss_{name}": value.mean().detach() for name, value in self.parts.items()}
        if self.global_loss is not None:
            logs["loss_global"] = self.global_loss.mean().detach()
        return logs


class Objective(nn.Module):
    """The denoising loss of the config's family alone (SiT, DiT); methods add to it."""

    name: ClassVar[str]
    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions

    def __init__(self, options: ObjectiveOptions, cfg, model: nn.Module, data=None):
        super().__init__()
        self.options = options
        self.alignment = None  # AlignmentTargets of the methods that align to an encoder
        self.noising = build_noising(cfg)
        self.family = self.noising.family
        self.label_dropout = cfg.train.label_dropout
        self.null_class = model.null_class
        self.step = 0  # the optimizer step being taken (start_of_step)

    def hidden_layers(self) -> tuple[int, ...]:
        """Blocks whose outputs this method reads (1-based)."""
        return ()

    def attention_layers(self) -> tuple[int, ...]:
        """Blocks whose attention logits this method reads (1-based; HASTE's term)."""
        return ()

    def denoise(
        self,
        model,
        batch: Batch,
        generator: torch.Generator,
        time_groups: int = 1,
        global_token: torch.Tensor | None = None,
        extra_inputs=None,
    ) -> DenoisingStep:
        """One noised pass; ``time_groups`` consecutive rows share one drawn time (a group's draws).

        ``global_token`` [B, D_g] (REG): a clean token the network denoises beside the image, noised
        with the same interpolant and t; its loss is ``global_loss``.
        ``extra_inputs(t, generator)``: more keyword inputs of the network, drawn after the standard
        draws (DeepFlow's branch times).
        """
        # Draw order (t, noise, label dropout, then the token's noise) is fixed so that every method
        # sees the same draws.
        x = batch.x
        t = self.noising.draw_times(x.shape[0] // time_groups, generator, x.device).repeat_interleave(time_groups)
        noise = randn_like(x, generator)
        labels = drop_labels(batch.labels, self.label_dropout, self.null_class, generator)
        x_t = self.noising.add_noise(x, noise, t)
        model_t = self.noising.model_time(t)
        global_noise = global_t = None
        if global_token is not None:
            global_noise = randn_like(global_token, generator)
            global_t = self.noising.add_noise(global_token, global_noise, t)
        more = {} if extra_inputs is None else extra_inputs(t, generator)
        if attention := self.attention_layers():
            more["attention_layers"] = attention
        out = model(x_t, model_t, labels, hidden_layers=self.hidden_layers(), global_token=global_t, **more)
        prediction = self.noising.from_network(out.prediction)
        per_sample, parts = self.noising.loss_terms(prediction, x, noise, x_t, t)
        step = DenoisingStep(t, model_t, noise, x_t, labels, prediction, out.hidden, per_sample, parts, output=out)
        if global_token is not None:
            global_prediction = self.noising.from_network(out.global_prediction)
            step.global_loss = self.noising.loss_terms(global_prediction, global_token, global_noise, global_t, t)[0]
            step.global_token, step.global_noise, step.global_t = global_token, global_noise, global_t
            step.hidden_global = out.hidden_global
        return step

    def loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> LossOutput:
        step = self.denoise(model, batch, generator)
        return LossOutput(step.per_sample_loss.mean(), step.logs())

    def bind_ema(self, ema: nn.Module) -> None:
        """The training loop's EMA network (the same module all run long); unused by default."""

    def start_of_step(self, step: int) -> None:
        """Hook before each optimizer step (0-based ``step``), before its losses."""
        self.step = step

    def end_of_step(self, step: int, applied: bool) -> None:
        """Hook after each step; ``applied`` is False when the step was skipped as non-finite."""

    def warnings(self, record: dict[str, float]) -> dict[str, str]:
        """Known failure modes seen in a logged record (averaged over the logging window):
        {key: one-line message}. The loop prints each key once per run and logs it."""
        return {}

    def finalize(self, run_dir) -> list:
        """Hook at the end of a run (rank 0): method-specific plots; returns the files written."""
        return []


def drop_labels(labels: torch.Tensor | None, p: float, null_class: int, generator: torch.Generator):
    """Replace labels by the null class with probability p (classifier-free guidance training)."""
    if labels is None:
        return None
    drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on the CPU generator, so draws match on every device."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
