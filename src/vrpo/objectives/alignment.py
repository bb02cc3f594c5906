"""The mechanism every representation-alignment method shares.

Frozen encoder targets (computed on the fly or read from a feature cache), one projector
per encoder on the hidden states of block d, token grids reconciled between model and
encoder, and the patch-wise cosine. ``AlignmentObjective`` owns them for its subclasses:
REPA adds the cosine as a loss term, VRPO turns the same quantities into rewards; both
train either model family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from vrpo.data import pixel_resolution
from vrpo.encoders import build_encoder, pool_tokens, resample_tokens
from vrpo.encoders.cache import FeatureCache, cache_slug
from vrpo.errors import ConfigError
from vrpo.models import SIZES, ConvProjector, Projector, parse_arch
from vrpo.models.heads import PROJECTOR_INITS
from vrpo.objectives.base import Objective
from vrpo.objectives.cosine import token_cosine
from vrpo.objectives.schedules import ScheduledOptions


def default_encoder_depth(depth: int) -> int:
    """REPA's alignment depth: 8 for L/XL (24+ blocks), 4 for S/B (12), a third otherwise."""
    if depth >= 24:
        return 8
    if depth >= 12:
        return 4
    return max(1, depth // 3)


@dataclass
class AlignmentOptions(ScheduledOptions):
    encoders: list[str] = field(default_factory=lambda: ["efficientnet-lite0"])
    encoder_input_size: int = 0  # 0: the encoder's default (EfficientNet 256; DINOv2 224 * res / 256)
    encoder_weights: str | None = None  # DINOv2: local checkpoint (hub state dict or transformers folder)
    encoder_depth: int = 0  # block d whose output is aligned; 0: REPA's default for the depth
    projector_width: int = 2048
    projector_init: str = "default"  # default (PyTorch's) or xavier (uniform weights, zero biases: REPA's code)
    projector: str = "mlp"  # mlp (REPA's 3 linears) or conv (iREPA: one projector_kernel^2 convolution on the grid)
    projector_kernel: int = 3
    target_norm: str = "none"  # spatial (iREPA): tokens minus alpha x their mean over positions, over their std
    target_norm_alpha: float = 0.6
    token_grid: str = "resample_targets"  # or pool_model: average the model tokens down to the encoder grid
    resample_mode: str = "bilinear"  # bilinear, area, nearest (resample_targets)
    feature_cache: str | None = None  # cache root built by `vrpo cache-features`; None encodes on the fly

    def validate(self, cfg) -> None:
        super().validate(cfg)
        depth = SIZES[parse_arch(cfg.model.arch)[1]][1]
        if not 0 <= self.encoder_depth <= depth:
            raise ConfigError(
                f"objective.encoder_depth {self.encoder_depth} is outside blocks 1..{depth} of {cfg.model.arch}"
            )
        encoding = depth - cfg.model.decoder_depth  # DDT aligns a block of its condition encoder
        if cfg.model.decoder_depth and (self.encoder_depth or default_encoder_depth(depth)) > encoding:
            raise ConfigError(
                f"objective.encoder_depth must name a block of DDT's condition encoder (1..{encoding}), got "
                f"{self.encoder_depth or default_encoder_depth(depth)}"
            )
        if self.projector_init not in PROJECTOR_INITS:
            raise ConfigError(
                f"objective.projector_init must be one of {', '.join(PROJECTOR_INITS)}, got {self.projector_init!r}"
            )
        if self.projector not in ("mlp", "conv") or self.target_norm not in ("none", "spatial"):
            raise ConfigError(
                f"objective.projector must be mlp or conv and objective.target_norm none or spatial, got "
                f"{self.projector!r}, {self.target_norm!r}"
            )
        if self.projector == "conv" and (self.projector_kernel < 1 or self.projector_kernel % 2 == 0):
            raise ConfigError(f"objective.projector_kernel must be odd and >= 1, got {self.projector_kernel}")
        if self.token_grid not in ("resample_targets", "pool_model"):
            raise ConfigError(f"objective.token_grid must be resample_targets or pool_model, got {self.token_grid!r}")
        if self.resample_mode not in ("bilinear", "area", "nearest"):
            raise ConfigError(f"objective.resample_mode must be bilinear, area or nearest, got {self.resample_mode!r}")
        if not self.encoders:
            raise ConfigError("objective.encoders needs at least one encoder")
        if cfg.data.name == "tensors" and not self.feature_cache:
            raise ConfigError("latent data (data.name=tensors) has no pixels to encode: set objective.feature_cache")

    def encoder_names(self) -> list[str]:
        return list(self.encoders)

    def build_encoders(self, resolution: int) -> list:
        return build_alignment_encoders(self, resolution)

    def cache_root(self) -> str | None:
        return self.feature_cache

    def without_feature_cache(self) -> AlignmentOptions:
        return replace(self, feature_cache=None)


def build_alignment_encoders(options: AlignmentOptions, resolution: int):
    encoders = []
    for name in options.encoders:
        opts = {}
        if name.startswith("efficientnet") and options.encoder_input_size:
            opts["input_size"] = options.encoder_input_size
        if name.startswith(("dinov2", "hf:")):
            # REPA's 224 * res / 256 rule is for 256+ px images; smaller ones are upsampled to 224.
            opts["resolution"] = max(resolution, 256)
            if name.startswith("dinov2"):
                opts["weights"] = options.encoder_weights
            if options.encoder_input_size:
                opts["input_size"] = options.encoder_input_size
        encoders.append(build_encoder(name, **opts))
    return encoders


class AlignmentTargets(nn.Module):
    """Encoder targets and projectors; ``cosine(hidden, batch)`` is the per-sample patch-wise cosine."""

    def __init__(self, options: AlignmentOptions, cfg, model, data=None):
        super().__init__()
        self.options = options
        self.depth = options.encoder_depth or default_encoder_depth(model.depth)
        # Encoders are frozen and large: kept out of the module tree so they are neither
        # checkpointed nor handed to the optimizer.
        pixels = pixel_resolution(cfg.data)  # a latent run's encoders read the stored crops
        self.__dict__["encoders"] = build_alignment_encoders(options, pixels)
        self.projectors = nn.ModuleList(build_projector(options, model, e.token_dim) for e in self.encoders)
        self.model_grid = (model.grid, model.grid)
        image_hw = (pixels, pixels)
        self.encoder_grids = [tuple(e.grid_for(image_hw)) for e in self.encoders]
        if options.token_grid == "pool_model":
            for e, grid in zip(self.encoders, self.encoder_grids):
                if grid[0] > model.grid or grid[1] > model.grid:
                    raise ConfigError(
                        f"objective.token_grid=pool_model cannot pool the {model.grid}x{model.grid} model grid up "
                        f"to {e.name}'s {grid[0]}x{grid[1]}: use resample_targets"
                    )
        self.caches = None
        if options.feature_cache:
            if data is None:
                raise ValueError("a feature cache needs the dataset to verify against")
            self.caches = [FeatureCache(Path(options.feature_cache) / cache_slug(e), e, data) for e in self.encoders]

    def on_the_fly(self, cfg, model) -> AlignmentTargets:
        """These projectors with targets encoded from pixels: held-out images are not in a training cache."""
        if self.caches is None:
            return self
        with torch.random.fork_rng(devices=[]):  # the throwaway heads must not move the global RNG
            other = AlignmentTargets(self.options.without_feature_cache(), cfg, model)
        other.projectors = self.projectors
        return other.to(next(self.projectors.parameters()).device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for e in self.encoders:  # follow .to(device) although unregistered
            e._apply(fn, recurse)
        return self

    def encoder_outputs(self, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens [B, N_enc, D], global [B, D']) per encoder, from the cache or computed now."""
        device = batch.x.device
        if self.caches is not None:
            return [c.lookup(batch.index, device) for c in self.caches]
        if batch.images is None:
            raise RuntimeError("alignment targets need pixel images or a feature cache")
        outs = [e(batch.images) for e in self.encoders]
        return [(o.tokens.float(), o.global_.float()) for o in outs]

    def targets(self, batch) -> list[torch.Tensor]:
        """Encoder tokens on the grid they are compared on (``pool_model`` keeps the encoder grid)."""
        return self.on_model_grid(self.encoder_outputs(batch))

    def on_model_grid(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """``targets`` from encoder outputs already at hand (VRPO also reads their global vectors)."""
        out = []
        for (tokens, _), grid in zip(outputs, self.encoder_grids):
            if self.options.target_norm == "spatial":
                tokens = spatial_normalize(tokens, self.options.target_norm_alpha)
            if grid != self.model_grid and self.options.token_grid == "resample_targets":
                tokens = resample_tokens(tokens, grid, self.model_grid, self.options.resample_mode)
            out.append(tokens)
        return out

    def project(self, hidden: torch.Tensor, projectors: nn.ModuleList | None = None) -> list[torch.Tensor]:
        """Projected hidden states per encoder, on the grid of that encoder's targets.

        ``projectors``: another set with one per encoder (VRPO's per-block heads); default ours.
        """
        out = []
        for proj, grid in zip(self.projectors if projectors is None else projectors, self.encoder_grids):
            z = proj(hidden)
            if grid != self.model_grid and self.options.token_grid == "pool_model":
                z = pool_tokens(z, self.model_grid, grid)
            out.append(z)
        return out

    @staticmethod
    def cosine(projected: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample mean over tokens of cos(phi(h), y), averaged over encoders: [B]."""
        return torch.stack([token_cosine(z, y).mean(dim=1) for z, y in zip(projected, targets)]).mean(dim=0)


def build_projector(options: AlignmentOptions, model, out_dim: int) -> nn.Module:
    """The configured head from the model's block width to an encoder's token width."""
    if options.projector == "conv":
        grid = (model.grid, model.grid)
        return ConvProjector(model.hidden_size, out_dim, grid, options.projector_kernel, options.projector_init)
    return Projector(model.hidden_size, out_dim, options.projector_width, options.projector_init)


def spatial_normalize(tokens: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's targets: per image and channel, (y - alpha mean_T y) / (std_T y + eps) over the token
    positions. A channel constant over the positions (a post-activation EfficientNet channel often is)
    carries no spatial structure and becomes 0: divided by eps it would be ~1e6 and own the cosine."""
    std = tokens.std(dim=1, keepdim=True)
    constant = std <= 1e-5 * tokens.abs().amax(dim=1, keepdim=True)
    normalised = (tokens - alpha * tokens.mean(dim=1, keepdim=True)) / (std + eps)
    return normalised.masked_fill(constant, 0.0)


class AlignmentObjective(Objective):
    """A method that aligns block states to frozen encoder targets (``self.alignment``)."""

    Options = AlignmentOptions

    def __init__(self, options: AlignmentOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        self.alignment = AlignmentTargets(options, cfg, model, data)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.alignment.depth,)


def _rename_legacy_keys(state_dict, prefix, *args) -> None:
    """Checkpoints written before the contract named the targets ``align``."""
    legacy = prefix + "align."
    for key in [k for k in state_dict if k.startswith(legacy)]:
        state_dict[prefix + "alignment." + key[len(legacy) :]] = state_dict.pop(key)
