"""Networks: the SiT/DiT transformer and the projector heads that alignment methods train."""

from vrpo.models.heads import ConvProjector, Projector
from vrpo.models.registry import SIZES, build_model, model_names, parse_arch
from vrpo.models.transformer import DiffusionTransformer, ModelOutput

__all__ = [
    "SIZES",
    "ConvProjector",
    "DiffusionTransformer",
    "ModelOutput",
    "Projector",
    "build_model",
    "model_names",
    "parse_arch",
]
