"""The named architectures: FAMILY-SIZE/PATCH (SiT or DiT; T, S, B, L, XL; patch 1, 2, 4, 8)."""

from __future__ import annotations

from vrpo.models.deepflow import DeepFlowTransformer
from vrpo.models.transformer import DiffusionTransformer

# width, depth, heads
SIZES = {
    "T": (192, 6, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
PATCHES = (1, 2, 4, 8)


def model_names() -> list[str]:
    return [f"{family}-{size}/{p}" for family in ("SiT", "DiT") for size in SIZES for p in PATCHES]


def parse_arch(name: str) -> tuple[str, str, int]:
    """'SiT-T/2' -> ('SiT', 'T', 2); a clear error for anything else."""
    try:
        family, rest = name.split("-", 1)
        size, patch = rest.split("/")
        if family in ("SiT", "DiT") and size in SIZES and int(patch) in PATCHES:
            return family, size, int(patch)
    except ValueError:
        pass
    raise ValueError(
        f"unknown architecture {name!r}: expected FAMILY-SIZE/PATCH, e.g. SiT-T/2 (sizes {', '.join(SIZES)}; "
        f"patches {PATCHES})"
    )


def build_model(arch: str, input_size: int, in_channels: int, num_classes: int, **overrides) -> DiffusionTransformer:
    """The named architecture; ``overrides`` set other constructor options (mlp_ratio, qk_norm,
    global_token_dim); None keeps a default."""
    family, size, patch = parse_arch(arch)
    width, depth, heads = SIZES[size]
    kwargs = dict(hidden_size=width, depth=depth, num_heads=heads, learn_sigma=family == "DiT")
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if kwargs.get("branch_blocks"):  # DeepFlow's branched network
        return DeepFlowTransformer(
            input_size=input_size, in_channels=in_channels, patch_size=patch, num_classes=num_classes, **kwargs
        )
    kwargs.pop("branch_blocks", None)
    return DiffusionTransformer(
        input_size=input_size, in_channels=in_channels, patch_size=patch, num_classes=num_classes, **kwargs
    )
