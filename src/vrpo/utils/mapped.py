"""Safetensors files as memory-mapped arrays, and row gathers across shards.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of each
tensor) and the raw bytes. Mapping the bytes lets a gather of a few rows read only those rows from
disk (the page cache keeps what is hot): a data set or a feature cache is never loaded whole.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16, "U8": np.uint8,
          "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}  # fmt: skip


class MappedFileError(ValueError):
    """A file that is not a complete safetensors file of the expected tensors."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.detail = path, detail


def map_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """Every tensor of ``path`` as a read-only memory-mapped array, and the names of the bf16 ones
    (mapped as uint16: ``to_torch`` views them back)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise MappedFileError(path, f"header length {length} exceeds the file ({size} bytes)")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a mapping")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise MappedFileError(path, f"not a readable safetensors file ({err})") from None
    start = 8 + length
    arrays, bf16 = {}, set()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES.get(entry["dtype"]), list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MappedFileError(path, f"tensor {name!r} has a malformed header entry ({entry})") from None
        if dtype is None or start + end > size or end - begin != np.dtype(dtype).itemsize * int(np.prod(shape)):
            raise MappedFileError(path, f"tensor {name!r} is truncated or of an unknown dtype ({entry})")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=tuple(shape))
        if entry["dtype"] == "BF16":
            bf16.add(name)
    return arrays, bf16


def to_torch(array: np.ndarray, bf16: bool = False) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if bf16 else tensor


class MappedShards:
    """Tensors split by rows over several mapped files: ``gather(name, index)`` reads those rows only."""

    def __init__(self, paths: list[Path], keys: tuple[str, ...]):
        self.paths, self.keys = list(paths), keys
        if not self.paths:
            raise MappedFileError(Path("."), "no shard files to read")
        self.files, self.bf16 = [], set()
        for path in self.paths:
            arrays, bf16 = map_safetensors(path)
            self.bf16 |= bf16
            missing = [key for key in keys if key not in arrays]
            if missing:
                raise MappedFileError(path, f"lacks {', '.join(missing)} (holds {sorted(arrays)[:6]})")
            lengths = {arrays[key].shape[0] for key in keys}
            if len(lengths) != 1:
                raise MappedFileError(path, f"its tensors {keys} hold different numbers of rows")
            if self.files and any(
                (arrays[key].dtype, arrays[key].shape[1:]) != (self.files[0][key].dtype, self.files[0][key].shape[1:])
                for key in keys
            ):
                raise MappedFileError(path, f"its tensors' dtypes or row shapes differ from {self.paths[0].name}'s")
            self.files.append(arrays)
        self.counts = [self.files[i][keys[0]].shape[0] for i in range(len(self.files))]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, name: str, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Rows ``index`` (global, any order) of tensor ``name``."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1} of {self.paths[0].parent}")
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        first = self.files[0][name]
        out = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard):
            chosen = shard == s
            out[chosen] = self.files[s][name][index[chosen] - self.offsets[s]]
        return to_torch(out, bf16=name in self.bf16)
