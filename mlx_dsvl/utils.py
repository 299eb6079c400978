"""Small helpers shared across the library (no model, no MLX)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over files, each by its name and :func:`file_digest` (renaming one changes it)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{file_digest(p)}\n".encode())
    return h.hexdigest()
