"""On the GPU machine: the staged fp16 weights back to fp32 under their original names.

python3 scripts/gpu/unpack.py .gpu /tmp/vrpo-site   # then PYTHONPATH=src:/tmp/vrpo-site
"""

from __future__ import annotations

import gzip
import io
import shutil
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: unpack.py STAGED_FOLDER SITE_FOLDER")
    staged, site = Path(argv[0]) / "weights", Path(argv[1])
    if not staged.is_dir():
        raise SystemExit(f"unpack: {staged} is missing: run scripts/gpu/stage.py here and carry its folder")
    shutil.copytree(staged, site, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.fp16.gz"))
    for half in staged.rglob("*.fp16.gz"):
        target = site / half.relative_to(staged).with_suffix("").with_suffix("")  # x.pt.fp16.gz -> x.pt
        with gzip.open(half, "rb") as f:
            raw = io.BytesIO(f.read())
        if target.suffix == ".pt":  # TorchScript (the FID Inception)
            torch.jit.save(torch.jit.load(raw, map_location="cpu").float(), str(target))
        else:  # a state dict
            state = torch.load(raw, map_location="cpu", weights_only=True)
            torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, target)
        print(f"unpack: {target} (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
