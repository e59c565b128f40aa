"""Content fingerprints of input files: what `mvke pipeline` keys its cache on.

A step is skipped only when its inputs are the same bytes and its configuration the
same options, not when a directory of the same name exists (re-splitting the data under
the same directory must retrain). Files are hashed whole (sha256, 1 MiB at a time: about
1 s per GB on one core); names starting with `_` or `.` are skipped, like every other
reader of a dataset directory (job markers, rejects, temporary files live there).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """`root` itself when it is a file, else every file under it (sorted; `_`/`.` names skipped)."""
    if root.is_file():
        return [root]
    return sorted(f for f in root.rglob("*") if f.is_file()
                  and not any(c.startswith(("_", ".")) for c in f.relative_to(root).parts))


def tree_fingerprint(root: str | Path) -> str:
    """16 hex over every file's relative path, size and sha256 (see the module docstring)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    entries = [(str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, file_sha256(f))
               for f in tree_files(root)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def config_fingerprint(**config: Any) -> str:
    """16 hex over a step's options (sorted JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
