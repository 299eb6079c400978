"""Damaged files for fault tests: the ways a file on disk breaks (an interrupted copy, a zeroed
block device, random corruption)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HOW = ("truncated", "zeroed", "random")


def damage_file(path: Path, how: str) -> None:
    """Overwrite ``path`` in place: its first half only, zeros, or random bytes (same length)."""
    data = Path(path).read_bytes()
    if how == "truncated":
        Path(path).write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        Path(path).write_bytes(bytes(len(data)))
    elif how == "random":
        Path(path).write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
