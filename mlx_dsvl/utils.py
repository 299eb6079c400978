"""Small helpers shared across the library (no model, no MLX)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def release_free_memory() -> None:
    """Hand freed heap memory back to the system where the C library keeps it (glibc's
    ``malloc_trim``: a decoded 81-megapixel image would otherwise stay resident); elsewhere a no-op."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


_LIBC = ctypes.CDLL(None) if os.name == "posix" else None


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def print_names(text: str, file: TextIO | None = None) -> None:
    """``print(text)`` for text holding file names: a name's bytes that are not UTF-8 (Python's
    ``surrogateescape`` stand-ins) go out as they came in, where ``print`` would raise
    ``UnicodeEncodeError`` (stdout is strict in most UTF-8 locales)."""
    file = sys.stdout if file is None else file
    try:
        print(text, file=file)
    except UnicodeEncodeError:
        file.flush()
        file.buffer.write(os.fsencode(text + "\n"))
        file.buffer.flush()


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over files, each by its name and :func:`file_digest` (renaming one changes it)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{file_digest(p)}\n".encode())
    return h.hexdigest()
