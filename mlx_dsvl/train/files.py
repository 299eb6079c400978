"""Writing training outputs safely: atomic replacement, durable renames, clear write errors.

Temporary names carry the writer's pid (``.NAME.tmpPID.xxxx[.suffix]``), so that a later run
can tell what a killed writer left behind and remove it (:func:`remove_abandoned`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_TMP_PID = re.compile(r"\.tmp(\d+)\.")
_UMASK = os.umask(0)
os.umask(_UMASK)


def tmp_prefix(name: str) -> str:
    return f".{name}.tmp{os.getpid()}."


def remove_abandoned(folder: Path) -> None:
    """Remove the temporary files and folders in ``folder`` whose writer is gone."""
    for p in folder.glob(".*.tmp*"):
        m = _TMP_PID.search(p.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (where the platform allows it on a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_arrays(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """``mx.save_safetensors``, with a failed write (MLX raises RuntimeError) as an OSError."""
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    except RuntimeError as e:
        free = shutil.disk_usage(path.parent).free
        raise OSError(f"{str(e).rstrip('.')}, {free / 1e6:.0f} MB free on that disk") from None


def replace_atomic(path: Path, write, durable: bool = True) -> None:
    """Call ``write(tmp_path)``, then move the result onto ``path`` in one step (``durable``:
    fsynced first, so that a power loss cannot leave an empty file behind)."""
    # MLX appends ".safetensors" to a file name without it: keep the suffix
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        tmp.chmod(0o666 & ~_UMASK)  # as a plain open() would create it (mkstemp: 0600)
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomic(path, lambda tmp: tmp.write_text(text))
