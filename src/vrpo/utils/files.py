"""Atomic writes into folders that several processes share (reference statistics, feature caches)."""

from __future__ import annotations

import os
from pathlib import Path


def private_temp(path: str | Path) -> Path:
    """A temporary name beside ``path`` that no other process uses: write there, then
    ``os.replace`` it onto ``path``. A shared name lets two writers rename each other's file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
