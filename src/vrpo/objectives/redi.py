"""ReDi (Kouzelis et al. 2025, "Boosting generative image modeling via joint image-feature
synthesis"): the network generates the image and the first K principal components of the
encoder's patch features together, as K extra channels (``model.representation_channels``).

The PCA is fitted once on the training set's features (z-scored per channel, as the official
``calc_pca.py``), and kept in the objective's state, so that a resumed run uses the same one. The
components' token grid is resized to the image's (bilinear, as the official code does from DINOv2's
16 x 16 to the 32 x 32 latent). The loss is the image's velocity loss plus ``representation_weight``
times the components' (each a mean over its own channels). With ``representation_dropout`` p a
sample's clean components are zeroed and get no loss (the official code drops a whole batch with
probability p); a model trained so can be sampled with representation guidance
(``sampler.representation_guidance``). ``proj_coeff`` > 0 adds REPA's alignment on top (ReDi's
"ReDi + REPA"); 0, the default, is ReDi alone. Recipe (SiT-XL/2): DINOv2-B with registers, K = 8."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vrpo.encoders import tokens_to_map
from vrpo.errors import ConfigError
from vrpo.objectives.base import Batch, DenoisingStep
from vrpo.objectives.repa import REPA, REPAOptions

_DROPOUT_STREAM = 0x2ED1  # the dropout draws' own generator, so the standard draws stay every method's


@dataclass
class ReDiOptions(REPAOptions):
    name: str = "redi"
    families: ClassVar[tuple[str, ...]] = ("flow",)
    components: int = 8  # K
    representation_weight: float = 1.0  # on the components' velocity loss
    representation_dropout: float = 0.0  # p: a sample's components zeroed and unweighted
    whiten: bool = False  # divide each component by its standard deviation (the official default: no)
    pca_images: int = 2000  # training images whose features fit the PCA
    proj_coeff: float = 0.0  # REPA on top (0: ReDi alone)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if len(self.encoders) != 1 or self.components < 1 or self.pca_images < 2:
            raise ConfigError(
                f"objective redi needs one encoder, components >= 1 and pca_images >= 2, got {len(self.encoders)}, "
                f"{self.components}, {self.pca_images}"
            )
        if cfg.data.name == "latents":
            raise ConfigError(
                "objective redi fits its PCA on an in-memory pixel set; data.name=latents is not supported yet"
            )
        if cfg.model.representation_channels != self.components:
            raise ConfigError(
                f"objective redi generates {self.components} components as channels: model.representation_channels "
                f"must be {self.components}, got {cfg.model.representation_channels}"
            )
        if not 0.0 <= self.representation_dropout < 1.0 or self.representation_weight < 0.0:
            raise ConfigError("objective.representation_dropout must be in [0, 1) and representation_weight >= 0")

    def model_defaults(self, arch: str) -> dict:
        return {"representation_channels": self.components}

    def alignment_coefficients(self, record: dict[str, float]) -> dict[str, float]:
        return {**super().alignment_coefficients(record), "representation": self.representation_weight}


class ReDi(REPA):
    name = "redi"
    Options = ReDiOptions

    def __init__(self, options: ReDiOptions, cfg, model, data=None):
        super().__init__(options, cfg, model, data)
        if options.proj_coeff == 0.0:  # ReDi alone: REPA's projector is not trained (nor optimised)
            self.alignment.projectors.requires_grad_(False)
        encoder = self.alignment.encoders[0]
        self.encoder_grid = self.alignment.encoder_grids[0]
        self.image_size = (model.input_size, model.input_size)
        d, k = encoder.token_dim, options.components
        if k > d:
            raise ConfigError(f"objective.components {k} exceeds {encoder.name}'s feature width {d}")
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.register_buffer("basis", torch.zeros(k, d))  # the components, rows
        self.register_buffer("variances", torch.zeros(k))  # their eigenvalues
        self.register_buffer("explained", torch.zeros(()))  # their share of the total variance
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        if data is not None:
            self.fit(data)

    @torch.no_grad()
    def fit(self, data) -> None:
        """The PCA of the z-scored patch features of ``pca_images`` training images (a fixed subset)."""
        n = min(self.options.pca_images, len(data))
        index = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n].sort().values
        chunks = []
        for start in range(0, n, 256):
            rows = index[start : start + 256]
            images = None if data.is_latent else data.images[rows]
            batch = Batch(data.images[rows].float(), None, images, rows)
            chunks.append(self.alignment.encoder_outputs(batch)[0][0].flatten(0, 1).double().cpu())
        features = torch.cat(chunks)
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        z = (features - mean) / std
        z = z - z.mean(0)
        values, vectors = torch.linalg.eigh(z.T @ z / (z.shape[0] - 1))  # ascending
        top = vectors[:, -self.options.components :].flip(1).T
        signs = top.gather(1, top.abs().argmax(1, keepdim=True)).sign()  # a fixed sign per component
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.basis.copy_(top * signs)
        self.variances.copy_(values[-self.options.components :].flip(0).clamp_min(0))
        self.explained.copy_(self.variances.sum() / values.clamp_min(0).sum())
        self.fitted.fill_(True)

    def components_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [B, T, D] as K component maps at the image's size [B, K, H, W]."""
        z = (tokens.float() - self.feature_mean) / self.feature_std
        projected = z @ self.basis.T
        if self.options.whiten:
            projected = projected / self.variances.clamp_min(1e-12).sqrt()
        maps = tokens_to_map(projected, self.encoder_grid)
        if maps.shape[-2:] != self.image_size:
            maps = F.interpolate(maps, size=self.image_size, mode="bilinear", align_corners=False)
        return maps

    def noised_pass(self, model, batch: Batch, generator) -> tuple[DenoisingStep, list]:
        if not bool(self.fitted):
            raise RuntimeError(
                "ReDi's PCA is not fitted: build the objective with the training data, or load its state"
            )
        outputs = self.alignment.encoder_outputs(batch)
        components = self.components_of(outputs[0][0]).to(batch.x.dtype)
        drop = torch.zeros(batch.x.shape[0], dtype=torch.bool)
        if self.options.representation_dropout:
            own = torch.Generator().manual_seed(generator.initial_seed() ^ _DROPOUT_STREAM)
            drop = torch.rand(batch.x.shape[0], generator=own) < self.options.representation_dropout
        keep = (~drop).to(batch.x.device)
        components = components * keep.view(-1, 1, 1, 1).to(components.dtype)
        joint = Batch(torch.cat([batch.x, components], dim=1), batch.labels, batch.images, batch.index)
        step = self.denoise(model, joint, generator)
        c = batch.x.shape[1]  # the image's channels, then the components'
        parts = [
            self.noising.loss_terms(step.prediction[:, s], joint.x[:, s], step.noise[:, s], step.x_t[:, s], step.t)[0]
            for s in (slice(0, c), slice(c, None))
        ]
        step.per_sample_loss = parts[0]
        step.parts = {"denoise": parts[0], "representation": parts[1] * keep.to(parts[1].dtype)}
        return step, outputs

    def extra_loss(self, step: DenoisingStep) -> tuple[torch.Tensor, dict]:
        return self.options.representation_weight * step.parts["representation"].mean(), {}
