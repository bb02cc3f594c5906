"""JSON-lines files (run logs, metrics, warnings, timing): one writer, one reader that skips a cut line."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return records


def append_record(path: Path | str, record: dict) -> Path:
    """One JSON line appended to ``path`` (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(dict(record)) + "\n")
    return path
