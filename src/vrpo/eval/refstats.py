"""Cache of reference statistics (e.g. FID mu/sigma of a dataset) as a pickle-free .npz.

The file holds the statistic arrays plus one extra entry, a 1-element unicode
array with the JSON fingerprint of what produced them (dataset bytes, feature
extractor, resize method). Loading compares it with the fingerprint the caller
expects, so a stale or foreign cache is refused instead of silently used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vrpo.eval.inception import feature_extractor_info
from vrpo.utils.files import replacing
from vrpo.utils.types import PathLike

__all__ = ["FINGERPRINT_KEY", "dataset_fingerprint", "load_reference_stats", "save_reference_stats"]

FINGERPRINT_KEY = "__fingerprint_json__"


def _canonical_json(fingerprint: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(fingerprint), sort_keys=True, separators=(",", ":"))
    except TypeError as error:
        raise TypeError(f"fingerprint must be JSON-serialisable: {error}") from None


def dataset_fingerprint(
    images_uint8: np.ndarray | torch.Tensor,
    extractor_info: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Fingerprint of an image set and the features computed from it.

    ``data_sha256`` hashes the shape, then the raw bytes (C-order), so equal
    bytes in a different layout differ. ``extractor_info`` defaults to
    :func:`vrpo.eval.inception.feature_extractor_info` (name, version, resize).
    """
    if isinstance(images_uint8, torch.Tensor):
        images_uint8 = images_uint8.detach().cpu().numpy()
    images = np.ascontiguousarray(images_uint8)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    digest = hashlib.sha256()
    digest.update(json.dumps(list(images.shape)).encode())
    digest.update(images.reshape(-1))  # a view of the contiguous bytes, no copy
    if extractor_info is None:
        extractor_info = feature_extractor_info()
    return {"data_sha256": digest.hexdigest(), "data_shape": list(images.shape), **dict(extractor_info)}


def save_reference_stats(path: PathLike, stats: Mapping[str, np.ndarray], fingerprint: Mapping[str, Any]) -> None:
    """Write ``stats`` and ``fingerprint`` to ``path`` (.npz, no pickled objects), atomically."""
    if FINGERPRINT_KEY in stats:
        raise ValueError(f"stat name {FINGERPRINT_KEY!r} is reserved for the fingerprint")
    arrays = {}
    for name, value in stats.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"stat {name!r} has object dtype, which .npz cannot store without pickle")
        arrays[name] = array
    arrays[FINGERPRINT_KEY] = np.array([_canonical_json(fingerprint)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Writing through a file handle keeps np.savez from appending ".npz".
    with replacing(path) as temporary_path, open(temporary_path, "wb") as handle:
        np.savez(handle, **arrays)


def _differing_keys(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return sorted(key for key in set(stored) | set(expected) if stored.get(key, ...) != expected.get(key, ...))


def load_reference_stats(path: PathLike, expected_fingerprint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Read statistics saved by :func:`save_reference_stats`; ``ValueError`` if the fingerprint differs."""
    # Round-trip through JSON so tuples and lists compare equal, as they were stored.
    expected = json.loads(_canonical_json(expected_fingerprint))
    with np.load(path, allow_pickle=False) as archive:
        if FINGERPRINT_KEY not in archive.files:
            raise ValueError(f"reference stats {path} have no fingerprint; recompute them")
        stored = json.loads(str(archive[FINGERPRINT_KEY][0]))
        differing = _differing_keys(stored, expected)
        if differing:
            raise ValueError(
                f"reference stats {path} are stale or foreign: "
                f"fingerprint differs on {', '.join(differing)}; recompute them"
            )
        return {name: archive[name] for name in archive.files if name != FINGERPRINT_KEY}
