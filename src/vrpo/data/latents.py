"""VAE latents in shards, written once by ``vrpo prepare-latents`` and read lazily while training.

A folder holds ``manifest.json`` and ``shard-NNNNN.safetensors`` files. Each shard has the
posterior ``mean`` and ``std`` (fp16 [n, 4, R/8, R/8]), the ADM-cropped ``images`` (uint8
[n, 3, R, R], for encoders that run on the fly) and ``labels``. The manifest names the VAE, the
sha256 of its weights, the resolution, the count, the label map and every shard with its count.
Training draws ``scale * (mean + std * eps)`` with eps from the step's generator (REPA's way);
rows are read through safetensors' memory map, shard by shard, never the whole set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vrpo.data.datasets import DataError, class_folder_images, read_crops
from vrpo.errors import MissingExtra
from vrpo.utils.files import replacing
from vrpo.utils.mapped import MappedFileError, MappedShards

FORMAT = "vrpo-latents-1"
KEYS = ("mean", "std", "images", "labels")


def list_images(root: Path, labels_file: Path | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names) of an ImageNet-layout folder (one subfolder per class), or of a
    flat folder whose ``labels_file`` lists ``RELATIVE_PATH LABEL`` per line."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    if labels_file is not None:
        pairs = [line.split() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        if any(len(p) != 2 for p in pairs):
            raise DataError(f"labels file {labels_file}: each line must be 'RELATIVE_PATH LABEL'")
        names = sorted({p[1] for p in pairs})
        if all(name.isdigit() for name in names):  # numeric labels are the class indices themselves
            names = sorted(names, key=int)
        return [root / p[0] for p in pairs], [names.index(p[1]) for p in pairs], names
    return class_folder_images(root)


def load_vae(source: str, device: str = "cpu"):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise MissingExtra("latent runs need diffusers (the VAE): pip install -e .[imagenet]") from None
    vae = AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)  # without `accelerate`: no warning
    return vae.to(device).eval().requires_grad_(False)


class CropBatches(torch.utils.data.Dataset):
    """Batches of image paths, read and ADM-cropped (in DataLoader workers)."""

    def __init__(self, batches: list[list[Path]], resolution: int):
        self.batches, self.resolution = batches, resolution

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_crops(self.batches[i], self.resolution)


@torch.no_grad()
def prepare_latents(images: str | Path, out: str | Path, vae: str = "stabilityai/sd-vae-ft-ema",
                    resolution: int = 256, labels_file: str | Path | None = None, shard_size: int = 1024,
                    batch_size: int = 32, device: str = "cpu", workers: int = 0,
                    progress: bool = True) -> dict:  # fmt: skip
    """Encode a folder into shards; shards already written are kept, so a killed job resumes. Under
    torchrun each rank writes every world-size-th shard and rank 0 the manifest."""
    from safetensors.torch import save_file

    from vrpo.encoders.base import state_dict_sha256
    from vrpo.utils.dist import barrier, is_main, rank_and_world

    paths, labels, classes = list_images(Path(images), Path(labels_file) if labels_file else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = load_vae(vae, device)
    # what decides the shards' contents: a resume with other settings would mix two datasets
    settings = {
        "vae": vae,
        "vae_sha256": state_dict_sha256(net),
        "resolution": resolution,
        "shard_size": shard_size,
        "images": hashlib.sha256("\n".join(f"{p} {y}" for p, y in zip(paths, labels)).encode()).hexdigest(),
    }
    recorded = out / "prepare.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        old = json.loads(recorded.read_text())
        differ = [key for key in settings if old.get(key) != settings[key]]
        raise DataError(f"{out} was prepared with other settings ({', '.join(differ)} differ): use a new --out")
    if is_main():
        with replacing(recorded) as tmp:
            tmp.write_text(json.dumps(settings, indent=1))
    rank, world = rank_and_world()
    progress = progress and is_main()
    starts = range(0, len(paths), shard_size)
    shards = []
    for number, start in enumerate(tqdm(starts, desc="prepare-latents", unit="shard", disable=not progress)):
        name, count = f"shard-{number:05d}.safetensors", min(shard_size, len(paths) - start)
        shards.append({"file": name, "count": count})
        if number % world != rank or (out / name).is_file():
            continue
        parts = {key: [] for key in ("mean", "std", "images")}
        batches = [paths[b : min(b + batch_size, start + count)] for b in range(start, start + count, batch_size)]
        reader = torch.utils.data.DataLoader(CropBatches(batches, resolution), batch_size=None, num_workers=workers)
        for crops in reader:  # read and cropped by ``workers`` processes while the VAE encodes
            posterior = net.encode(crops.to(device).float() / 127.5 - 1).latent_dist
            parts["mean"].append(posterior.mean.half().cpu())
            parts["std"].append(posterior.std.half().cpu())
            parts["images"].append(crops)
        tensors = {key: torch.cat(value).contiguous() for key, value in parts.items()}
        tensors["labels"] = torch.tensor(labels[start : start + count], dtype=torch.int64)
        with replacing(out / name) as tmp:
            save_file(tensors, str(tmp))
    barrier()
    manifest = {
        "format": FORMAT, "vae": vae, "vae_sha256": settings["vae_sha256"], "resolution": resolution,
        "scaling_factor": float(getattr(net.config, "scaling_factor", 0.18215)), "count": len(paths),
        "classes": classes, "shards": shards,
    }  # fmt: skip
    if is_main():
        with replacing(out / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def manifest_of(root: str | Path) -> dict:
    """The manifest of a latent folder, checked to be one."""
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"latent folder {root}: no readable manifest.json ({err})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def is_latent_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder ``vrpo prepare-latents`` wrote (its manifest says so)."""
    try:
        return Path(path).is_dir() and bool(manifest_of(path))
    except DataError:
        return False


class LatentShards:
    """The rows of a latent folder, read on demand through memory-mapped shards (``rows(index)``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = manifest_of(root)
        entries = self.manifest["shards"]
        paths = [self.root / entry["file"] for entry in entries]
        for path in paths:
            if not path.is_file():
                raise DataError(f"shard {path} is missing, corrupt or foreign: not found")
        try:
            self.mapped = MappedShards(paths, KEYS)
        except MappedFileError as err:
            raise DataError(f"shard {err.path} is missing, corrupt or foreign: {err.detail}") from None
        for path, entry, count in zip(paths, entries, self.mapped.counts):
            if count != entry["count"]:
                raise DataError(f"shard {path} holds {count} rows, its manifest says {entry['count']}")
        if len(self.mapped) != self.manifest["count"]:
            raise DataError(
                f"latent folder {root}: shards hold {len(self.mapped)} rows, the manifest says {self.manifest['count']}"
            )
        first = self.mapped.files[0]
        self.latent_shape = tuple(first["mean"].shape[1:])
        self.image_shape = tuple(first["images"].shape[1:])
        self.labels = self.mapped.gather("labels", np.arange(len(self.mapped))).long()

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def rows(self, index: torch.Tensor, keys: tuple[str, ...] = ("mean", "std", "images")) -> dict[str, torch.Tensor]:
        """``mean``, ``std`` (float32) and ``images`` (uint8) of these rows, read through the memory map."""
        return {key: self.mapped.gather(key, index) if key == "images" else self.mapped.gather(key, index).float()
                for key in keys}  # fmt: skip


class LatentSet:
    """A latent folder (or some of its rows) as a data set: ``batch_rows`` draws posterior samples."""

    is_latent = True

    def __init__(self, root: str | Path, rows: torch.Tensor | None = None, name: str | None = None):
        self.shards = shards = root if isinstance(root, LatentShards) else LatentShards(root)
        self.rows = rows  # indices into the folder; None: every row
        self.labels = shards.labels if rows is None else shards.labels[rows]
        self.num_classes = len(shards.manifest["classes"])
        self.scale = shards.manifest["scaling_factor"]
        self.name = name or f"latents:{shards.root.name}"
        self.channels, self.resolution = shards.latent_shape[0], shards.latent_shape[-1]
        self.pixel_resolution = shards.image_shape[-1]
        self.fingerprint = json.dumps(shards.manifest, sort_keys=True)  # its VAE, crops and shards
        if rows is not None:
            self.fingerprint += hashlib.sha256(rows.numpy().astype(np.int64).tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor, name: str) -> LatentSet:
        return LatentSet(self.shards, index if self.rows is None else self.rows[index], name)

    def _folder_rows(self, index: torch.Tensor, *keys: str) -> dict[str, torch.Tensor]:
        return self.shards.rows(index if self.rows is None else self.rows[index], *([keys] if keys else []))

    def batch_rows(self, index: torch.Tensor, generator: torch.Generator | None):
        """(scale * (mean + std * eps), the stored uint8 images), eps from ``generator``; without a
        generator the posterior mean (evaluations)."""
        rows = self._folder_rows(index)
        if generator is None:
            return self.scale * rows["mean"], rows["images"]
        eps = torch.randn(rows["mean"].shape, generator=generator)
        return self.scale * (rows["mean"] + rows["std"] * eps), rows["images"]

    def pixels(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The stored ADM crops (uint8) of these rows (all when None)."""
        return self._folder_rows(torch.arange(len(self)) if index is None else index, "images")["images"]


_DECODERS: dict[tuple[str, str], tuple] = {}


def latent_decoder(cfg, device):
    """The VAE that decodes a latent run's samples to pixels in [-1, 1] (None for pixel runs): the
    one the run's latent folder was prepared with, read from its manifest, loaded once per device."""
    if cfg.data.name != "latents":
        return None
    key = (str(cfg.data.root), str(device))
    if key not in _DECODERS:
        path = Path(cfg.data.root or "") / "manifest.json"
        if not cfg.data.root or not path.is_file():
            raise DataError(f"a latent run decodes through the VAE its latent folder names: no {path} (data.root)")
        manifest = json.loads(path.read_text())
        _DECODERS[key] = (load_vae(manifest["vae"], device), manifest["scaling_factor"])
    vae, scale = _DECODERS[key]
    return lambda latents: vae.decode(latents.float() / scale).sample
