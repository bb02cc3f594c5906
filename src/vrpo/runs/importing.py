"""`vrpo import-checkpoint`: a checkpoint of the official REPA, SiT or DiT code as a run folder.

The file is read with ``torch.load(weights_only=True)`` and an explicit allow-list of the
objects those codes pickle besides tensors (their ``args`` namespace): anything else is
refused, never unpickled. Key names are mapped to this project's layout, the weights are
loaded strictly into the network the shapes describe, and the run folder is written as
safetensors with the official conventions (``conventions: official`` for SiT and REPA).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from pathlib import Path

import torch

from vrpo.config import load_config, save_config
from vrpo.models import SIZES, Projector, build_model, model_names
from vrpo.models.transformer import sincos_pos_embed_2d
from vrpo.runs.checkpoint import CheckpointError, save_checkpoint, step_dirs

SOURCES = ("repa", "sit", "dit")
# What the official training scripts pickle besides tensors and plain containers: `"args": args`.
ALLOWED_GLOBALS = [argparse.Namespace]
RENAMES = [  # official prefix or infix -> this project's
    ("x_embedder.proj.", "patch_embed."),
    ("y_embedder.embedding_table.", "y_embedder.table."),
    (".adaLN_modulation.", ".ada."),
]


def read_foreign_checkpoint(path: str | Path) -> object:
    """The unpickled file; a one-line CheckpointError for a missing, corrupt or disallowed one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else str(err).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to unpickle {what}: only tensors, plain containers, numbers, strings and "
            "argparse.Namespace are allowed"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(err).splitlines()[0]})") from None


def _is_state(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def states_of(obj, path) -> dict[str, dict[str, torch.Tensor]]:
    """{'model': ..., 'ema': ...} of a training checkpoint, or a bare state dict (REPA's released
    last.pt) as both."""
    if _is_state(obj):
        return {"model": obj, "ema": obj}
    if isinstance(obj, dict) and any(_is_state(obj.get(k)) for k in ("model", "ema")):
        found = {k: obj[k] for k in ("model", "ema") if _is_state(obj.get(k))}
        return {"model": found.get("model", found.get("ema")), "ema": found.get("ema", found.get("model"))}
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: neither a state dict nor a checkpoint with 'model' / 'ema' state dicts ({keys})")


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, torch.Tensor | None]:
    """(network weights, projector weights, pos_embed) in this project's names."""
    network, projectors, pos_embed = {}, {}, None
    for key, value in state.items():
        if key == "pos_embed":  # fixed sin-cos here: a buffer, checked instead of loaded
            pos_embed = value
        elif key.startswith("projectors."):  # projectors.K.I.* -> alignment.projectors.K.net.I.*
            index, rest = key[len("projectors.") :].split(".", 1)
            projectors[f"alignment.projectors.{index}.net.{rest}"] = value
        else:
            for old, new in RENAMES:
                key = key.replace(old, new)
            network[key] = value
    return network, projectors, pos_embed


def architecture(network: dict[str, torch.Tensor], source: str) -> dict:
    """What the weights' shapes say: arch name, channels, classes, MLP ratio, qk-norm."""
    try:
        width, channels, patch, _ = network["patch_embed.weight"].shape
        classes = network["y_embedder.table.weight"].shape[0] - 1
        ratio = network["blocks.0.mlp.fc1.weight"].shape[0] / width
    except KeyError as err:
        raise CheckpointError(f"not a {source.upper()} checkpoint: no {err.args[0]} after renaming") from None
    depth = len({k.split(".")[1] for k in network if k.startswith("blocks.")})
    size = next((name for name, (w, d, _) in SIZES.items() if (w, d) == (width, depth)), None)
    if size is None:
        raise CheckpointError(f"width {width} and depth {depth} match none of the sizes {', '.join(SIZES)}")
    family = "DiT" if source == "dit" else "SiT"
    arch = f"{family}-{size}/{patch}"
    if arch not in model_names():
        raise CheckpointError(f"patch size {patch} is not available (architectures: {', '.join(model_names())})")
    qk_norm = any(".attn.q_norm." in k for k in network)
    return {"arch": arch, "channels": channels, "classes": classes, "mlp_ratio": ratio, "qk_norm": qk_norm}


def drop_sigma(network: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """SiT's learned-sigma outputs left out: the output rows are (p, p, 2C) with the channel innermost,
    and the first C channels are the velocity (SiT's forward keeps them alone)."""
    weight, bias = network["final_layer.linear.weight"], network["final_layer.linear.bias"]
    keep = torch.arange(weight.shape[0]) % (2 * channels) < channels
    return {**network, "final_layer.linear.weight": weight[keep], "final_layer.linear.bias": bias[keep]}


def load_strictly(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise CheckpointError(
            f"{what} does not fit the network its shapes describe: {str(err).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not fit the network its shapes describe: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )


def projector_heads(projectors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state-dict keys are an alignment objective's (alignment.projectors.K.net.I.*)."""
    count = len({k.split(".")[2] for k in projectors})
    heads = torch.nn.Module()
    heads.alignment = torch.nn.Module()
    heads.alignment.projectors = torch.nn.ModuleList()
    for k in range(count):
        first, last = (projectors[f"alignment.projectors.{k}.net.{i}.weight"] for i in (0, 4))
        heads.alignment.projectors.append(Projector(first.shape[1], last.shape[0], first.shape[0]))
    load_strictly(heads, projectors, "the projectors")
    return heads


def import_checkpoint(
    source: str, file: str | Path, out: str | Path, config: str | None = None, resolution: int | None = None,
    overrides: list[str] = (),
) -> Path:  # fmt: skip
    """Write run folder ``out`` from an official checkpoint ``file`` of ``source`` (repa, sit, dit)."""
    if source not in SOURCES:
        raise CheckpointError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    out = Path(out)
    if step_dirs(out) or (out / "config.yaml").exists():
        raise CheckpointError(f"{out} already holds a run: import into a new folder")
    obj = read_foreign_checkpoint(file)
    states = states_of(obj, file)
    network, projectors, pos_embed = split_state(states["model"])
    ema_network, ema_projectors, _ = split_state(states["ema"])
    if projectors and source != "repa":
        raise CheckpointError(f"{file} holds REPA projectors: import it with --from repa")
    shape = architecture(network, source)
    patch = network["patch_embed.weight"].shape[-1]
    outputs = network["final_layer.linear.weight"].shape[0] // (patch * patch)
    sit_own = source == "sit" and outputs == 2 * shape["channels"]  # willisma/SiT: learned sigma, data at t = 1
    if sit_own:
        network, ema_network = (drop_sigma(n, shape["channels"]) for n in (network, ema_network))
    if pos_embed is not None:
        measured = round(pos_embed.shape[1] ** 0.5) * patch
        if resolution not in (None, measured):
            raise CheckpointError(f"--resolution {resolution} differs from the checkpoint's {measured}")
        resolution = measured
    if resolution is None:
        raise CheckpointError(f"{file} has no pos_embed to read the input size from: give --resolution")
    settings = [
        f"model.arch={shape['arch']}",
        f"model.mlp_ratio={shape['mlp_ratio']}",
        f"model.qk_norm={str(shape['qk_norm']).lower()}",
        f"data.resolution={resolution}",
        *(["data.name=tensors"] if shape["channels"] == 4 else []),  # SD-VAE latents
        *(["conventions=official"] if source != "dit" else []),
        *(["transport.time_direction=data_at_1"] if sit_own else []),
        *(["objective={name: ddpm}", "sampler.method=ddpm"] if source == "dit" and config is None else []),
    ]
    cfg = load_config(config, [*settings, *overrides])
    build = dict(mlp_ratio=shape["mlp_ratio"], qk_norm=shape["qk_norm"])
    model = build_model(shape["arch"], resolution, shape["channels"], shape["classes"], **build)
    ema = build_model(shape["arch"], resolution, shape["channels"], shape["classes"], **build)
    load_strictly(model, network, f"{file} ('model')")
    load_strictly(ema, ema_network, f"{file} ('ema')")
    grid = resolution // patch
    fixed = sincos_pos_embed_2d(model.hidden_size, grid, grid)[None]
    if pos_embed is not None and (
        pos_embed.numel() != fixed.numel()
        or not torch.allclose(pos_embed.float().reshape(fixed.shape), fixed, atol=1e-5)
    ):
        raise CheckpointError(f"{file}'s pos_embed is not the fixed 2-D sin-cos embedding this network uses")
    aligned = bool(cfg.objective.encoder_names())  # the projectors belong to the run only if its objective aligns
    heads = projector_heads(projectors) if projectors and aligned else torch.nn.Module()
    if projectors and not aligned:
        print(f"note: {len(projectors)} projector tensors left out: the config's objective "
              f"'{cfg.objective.name}' has none (give --config with the REPA objective to keep them)")  # fmt: skip
    extra = None
    if projectors and aligned and cfg.train.ema_heads:
        extra = {"ema_heads": {k: v.detach().clone() for k, v in projector_heads(ema_projectors).state_dict().items()}}
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    step = int(obj.get("steps", 0)) if isinstance(obj, dict) and not _is_state(obj) else 0
    digest = hashlib.sha256()
    with open(file, "rb") as f:  # in chunks: a training checkpoint with optimizer state is many GB
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    digest = digest.hexdigest()
    meta = {"imported_from": {"source": source, "file": str(file), "sha256": digest}}
    no_state = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # an imported run has no optimizer state
    return save_checkpoint(out, step, model, ema, heads, no_state, meta, keep_last=1, extra=extra)
