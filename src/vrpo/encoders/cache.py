"""A feature cache: an encoder's tokens and global vectors for a whole dataset, computed once and
read lazily (memory-mapped rows), so it may be larger than memory.

Layout of one cache folder (one per encoder setting):
    manifest.json              encoder identity (name, weights hash, preprocessing, grid),
                               dataset fingerprint, dtype, shard size, number of images
    shard_00000.safetensors    tokens [n, N, D], global [n, D'] for images [k*n, (k+1)*n)

Shards are written atomically (temporary name, then rename), so an interrupted build
resumes at the first missing shard. Training checks the manifest against its own encoder
and dataset and refuses a cache made for anything else.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vrpo.utils.files import replacing
from vrpo.utils.mapped import MappedFileError, MappedShards

MANIFEST = "manifest.json"


class CacheMismatch(ValueError):
    pass


def cache_slug(encoder) -> str:
    """Folder name of an encoder setting inside a cache root."""
    return f"{encoder.name}-{encoder.preprocessing['resize']['size'][0]}"


def expected_manifest(encoder, data, dtype: str, shard_size: int) -> dict:
    return {
        "encoder": encoder.describe(),
        "grid": list(encoder.grid_for((data.pixel_resolution, data.pixel_resolution))),
        "dataset": {"name": data.name, "fingerprint": data.fingerprint, "num_images": len(data)},
        "dtype": dtype,
        "shard_size": shard_size,
    }


def _identity(manifest: dict) -> dict:
    """The parts that must match for the features to be the right ones."""
    return {"encoder": manifest["encoder"], "grid": manifest["grid"], "dataset": manifest["dataset"]}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def build_cache(
    folder: Path,
    encoder,
    data,
    dtype: str = "float16",
    shard_size: int = 1000,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Encode every image of ``data`` (pixels, or a latent folder's stored crops) into ``folder``
    (resuming a partial build)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = expected_manifest(encoder, data, dtype, shard_size)
    path = folder / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = _differences(_identity(old), _identity(manifest)) + (["dtype"] if old["dtype"] != dtype else [])
        if diff or old["shard_size"] != shard_size:
            raise CacheMismatch(
                f"{folder} holds another cache (differs in {', '.join(diff) or 'shard_size'}): choose another folder"
            )
    path.write_text(json.dumps({**manifest, "complete": False}, indent=1))
    torch_dtype = getattr(torch, dtype)
    starts = range(0, len(data), shard_size)
    for start in tqdm(starts, disable=not progress, desc=f"cache {encoder.name}"):
        shard = folder / f"shard_{start // shard_size:05d}.safetensors"
        if shard.exists():
            continue
        tokens, globals_ = [], []
        for b in range(start, min(start + shard_size, len(data)), batch_size):
            out = encoder(data.pixels(torch.arange(b, min(b + batch_size, start + shard_size, len(data)))))
            tokens.append(out.tokens.to("cpu", torch_dtype))
            globals_.append(out.global_.to("cpu", torch_dtype))
        with replacing(shard) as tmp:
            save_file({"tokens": torch.cat(tokens).contiguous(), "global": torch.cat(globals_).contiguous()}, str(tmp))
    path.write_text(json.dumps({**manifest, "complete": True}, indent=1))
    return folder


def is_complete(folder: Path) -> bool:
    manifest = Path(folder) / MANIFEST
    return manifest.exists() and bool(json.loads(manifest.read_text()).get("complete"))


def build_feature_caches(
    encoders, root: str | Path, load_data, *, skip_complete: bool = False, log=None, **build_options
) -> list[dict]:
    """The cache of every encoder under ``root`` (the one builder of ``vrpo cache-features``, the study
    and the benchmarks). ``load_data()`` gives the images, loaded only when a cache has to be built; a
    complete cache is verified again unless ``skip_complete``. Returns per encoder its folder, images,
    size and build seconds (this call); ``log`` gets the same as one line."""
    data, built = None, []
    for encoder in encoders:
        folder = Path(root) / cache_slug(encoder)
        if skip_complete and is_complete(folder):
            continue
        data = data if data is not None else load_data()
        start = time.perf_counter()
        build_cache(folder, encoder, data, **build_options)
        info = {"encoder": encoder.name, "folder": str(folder), "images": len(data),
                "grid": list(encoder.grid_for((data.pixel_resolution, data.pixel_resolution))),
                "mib": sum(p.stat().st_size for p in folder.iterdir()) / 2**20,
                "build_s": time.perf_counter() - start}  # fmt: skip
        built.append(info)
        if log is not None:
            log(f"{info['encoder']}: {info['images']} images, grid {tuple(info['grid'])}, {info['mib']:.1f} MiB "
                f"in {folder} ({info['build_s']:.0f} s this call)")  # fmt: skip
    return built


class FeatureCache:
    """A verified cache, read through a memory map: ``lookup(index)`` reads only those rows."""

    def __init__(self, folder: Path, encoder, data):
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise CacheMismatch(f"no feature cache at {folder}: build it with `vrpo cache-features --config CONFIG`")
        manifest = json.loads(path.read_text())
        expected = expected_manifest(encoder, data, manifest.get("dtype", "?"), manifest.get("shard_size", 0))
        diff = _differences(_identity(manifest), _identity(expected))
        if diff:
            raise CacheMismatch(
                f"feature cache {folder} was made for another encoder or dataset (differs in "
                f"{', '.join(diff[:5])}): rebuild it or point objective.feature_cache elsewhere"
            )
        if not manifest.get("complete"):
            raise CacheMismatch(f"feature cache {folder} is incomplete: rerun `vrpo cache-features` to finish it")
        shards = [folder / f"shard_{k:05d}.safetensors" for k in range(-(-len(data) // manifest["shard_size"]))]
        try:
            self.mapped = MappedShards(shards, ("tokens", "global"))
        except MappedFileError as err:
            raise CacheMismatch(f"feature cache shard {err.path} is damaged ({err.detail}): rebuild it") from None
        self.grid = tuple(manifest["grid"])
        if len(self.mapped) != len(data):
            raise CacheMismatch(f"feature cache {folder} holds {len(self.mapped)} images, the dataset {len(data)}")

    def lookup(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.cpu()
        tokens, global_ = (self.mapped.gather(key, index) for key in ("tokens", "global"))
        return tokens.to(device, torch.float32), global_.to(device, torch.float32)
