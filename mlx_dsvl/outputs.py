"""Outputs that survive an interrupted writer: atomic files, staged folders, one liveness rule.

A writer holds an exclusive ``flock`` on what it has not finished (a ``.NAME.tmp.XXXX``, or the
``.OUT.partial-XXXX.lock`` of a folder staged beside ``OUT``). The kernel drops it however the
writer dies, ``kill -9`` included, so leftovers are told from a live writer's without pids, which
are reused and differ between containers sharing a folder. A staged folder goes ``partial`` ->
``new`` (complete) -> swapped with ``OUT`` (moved to ``old``, removed); after a crash ``new``,
else ``old``, takes a missing ``OUT``'s place.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from .faults import fault_point

try:
    import fcntl
except ImportError:  # Windows: no flock; writing works, reclaiming is left to the user
    fcntl = None

LOCK = ".lock"
FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # disk full, quota exceeded
_TEMP = re.compile(r"\..+\.tmp\d*\.")  # \d*: older versions put the writer's pid there


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- signals as exceptions ----------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like KeyboardInterrupt, cleaning up on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM / SIGHUP raise :class:`Terminated` (once: a second one during the
    clean-up is ignored, so the clean-up finishes)."""

    def handler(signum, _frame):
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    handled = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, handler) for s in handled}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_command(work: Callable[[], object], errors: tuple = (ValueError, OSError)) -> tuple[int, object]:
    """Run ``work()`` with ``errors``, Ctrl-C, SIGTERM and SIGHUP as one ``error:`` line after the clean-up."""
    try:
        with signals_as_exceptions():
            return 0, work()
    except errors as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print("error: interrupted (nothing was written)", file=sys.stderr)
        return 130, None
    except Terminated as e:
        print(f"error: stopped by {e.name} (nothing was written)", file=sys.stderr)
        return 128 + e.signum, None


# -- held paths: the liveness rule --------------------------------------------------------------


def _create_unique(folder: Path, prefix: str, suffix: str, make: Callable[[Path], None]) -> Path:
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            make(path)
            return path
        except FileExistsError:
            continue


def _new_file(mode: int) -> Callable[[Path], None]:
    """Create an empty file; the umask applies to ``mode`` as it does for a plain ``open()``."""
    return lambda path: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)


def _hold(create: Callable[[], Path]) -> tuple[int | None, Path]:
    """Create a new path and lock it for this process: (the fd holding the lock, the path)."""
    while True:
        path = create()
        if fcntl is None:
            return None, path
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner looks at this very path
        except OSError:  # a filesystem without locks: write anyway; cleaners leave it alone
            return fd, path
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, path  # still ours: a cleaner that locked it first would have removed it
        os.close(fd)


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _lock_if_abandoned(path: Path) -> int | None:
    """The fd now holding ``path``'s lock if its writer is gone (remove, then close); None if alive."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            return None
        raise
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- atomic files ---------------------------------------------------------------------------------


@contextlib.contextmanager
def temporary(target: Path, folder: bool = False) -> Iterator[Path]:
    """A held ``.NAME.tmp.XXXX`` file (or 0700 folder) beside ``target``, removed if the block fails.
    It keeps ``target``'s suffix: MLX appends ``.safetensors`` to a name without it."""
    target = Path(target)
    make = (lambda p: p.mkdir(mode=0o700)) if folder else _new_file(0o666)
    fd, tmp = _hold(lambda: _create_unique(target.parent, f".{target.name}.tmp.",
                                           "" if folder else target.suffix, make))
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _release(fd)


def remove_abandoned(folder: Path) -> None:
    """Remove the temporary files and folders in ``folder`` whose writer is gone."""
    if fcntl is None:
        return
    for p in Path(folder).glob(".*.tmp*"):
        if not _TEMP.match(p.name):
            continue
        try:
            fd = _lock_if_abandoned(p)
        except OSError:  # gone meanwhile, or no locks here: leave it
            continue
        if fd is not None:
            _remove(p)
            os.close(fd)


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


def replace_atomic(path: Path, write: Callable[[Path], object], durable: bool = True) -> None:
    """``write(tmp_path)``, then a rename onto ``path`` (``durable``: fsynced first, so a power loss
    cannot leave an empty file)."""
    with temporary(path) as tmp:
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    replace_atomic(path, lambda tmp: tmp.write_text(text))


# -- staged folders -------------------------------------------------------------------------------


def _names(out: Path, suffix: str) -> tuple[Path, Path, Path, Path]:
    """(lock file, partial, new and old folder) of one writer into ``out``."""
    partial = out.parent / f".{out.name}.partial-{suffix}"
    return (partial.with_name(partial.name + LOCK), partial, out.parent / f".{out.name}.new-{suffix}",
            out.parent / f".{out.name}.old-{suffix}")


def output_path(out: str | os.PathLike) -> Path:
    """``out`` absolute, without ``.`` or ``..`` (its siblings are named after it)."""
    return Path(os.path.abspath(out))


class Staged:
    """A folder written as ``partial`` beside ``out`` under this process's lock, then put in
    place by :meth:`publish`; :meth:`abandon` undoes it.  ``out``'s parent must exist."""

    def __init__(self, out: str | os.PathLike):
        self.out = output_path(out)
        prefix = f".{self.out.name}.partial-"
        self._fd, lock = _hold(lambda: _create_unique(self.out.parent, prefix, LOCK, _new_file(0o600)))
        self.lock, self.partial, self.new, self.old = _names(self.out, lock.name[len(prefix):-len(LOCK)])

    def publish(self) -> None:
        """Put the complete ``partial`` folder in ``out``'s place (an earlier ``out`` is removed)."""
        fault_point("replace")
        os.rename(self.partial, self.new)  # complete: a kill from here on ends with it in place
        if os.path.lexists(self.out):
            os.rename(self.out, self.old)
            fault_point("replace")
            try:
                os.rename(self.new, self.out)
            except BaseException:
                os.rename(self.old, self.out)
                raise
        else:
            os.rename(self.new, self.out)
        fsync_dir(self.out.parent)
        shutil.rmtree(self.old, ignore_errors=True)

    def abandon(self) -> None:
        """Remove the unpublished folder (an earlier ``out`` moved aside goes back), then the lock."""
        if not os.path.lexists(self.out) and self.old.is_dir():
            os.rename(self.old, self.out)
        for d in (self.partial, self.new):
            shutil.rmtree(d, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Drop the lock (the folders first, then their lock: never the reverse)."""
        if self._fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def reclaim_stale(out: str | os.PathLike, progress: Callable[[str], None] = log, what: str | None = None) -> int:
    """Clear what dead writers into ``out`` left behind; returns the bytes freed."""
    out = output_path(out)
    if fcntl is None or not out.parent.is_dir():
        return 0
    freed, count = 0, 0
    prefix = f".{out.name}.partial-"
    for lock in sorted(out.parent.glob(glob.escape(prefix) + "*" + LOCK)):
        try:
            fd = _lock_if_abandoned(lock)
        except FileNotFoundError:
            continue
        except OSError as e:
            progress(f"note: cannot check whether {lock.name[:-len(LOCK)]} is still being written "
                     f"({e.strerror}); delete it yourself if nothing else writes into {out.name}")
            continue
        if fd is None:
            continue  # a live writer holds it
        try:
            _, partial, new, old = _names(out, lock.name[len(prefix):-len(LOCK)])
            if not os.path.lexists(out) and new.is_dir():
                new.rename(out)
                progress(f"completed the interrupted replacement of {out}")
            elif not os.path.lexists(out) and old.is_dir():
                old.rename(out)
                progress(f"restored {out}: a --force replacement of it was interrupted")
            shutil.rmtree(old, ignore_errors=True)  # replaced: the swap was done
            for d in (partial, new):
                if d.is_dir():
                    freed += folder_bytes(d)
                    count += 1
                    shutil.rmtree(d, ignore_errors=True)
            os.unlink(lock)
        finally:
            os.close(fd)
    if count:
        progress(f"removed {count} partial folder(s) of {what or f'interrupted writes into {out.name}'}: "
                 f"{human_bytes(freed)} freed")
    staged = re.compile(re.escape(f".{out.name}.") + r"(?:partial|new|old)-(.+)")
    for d in sorted(out.parent.glob(glob.escape(f".{out.name}.") + "*-*")):
        m = staged.fullmatch(d.name)
        if m and d.is_dir() and not _names(out, m.group(1))[0].exists():
            progress(f"note: {d} ({human_bytes(folder_bytes(d))}) has no lock file (left by an older "
                     f"version?); delete it yourself if nothing else writes into {out.name}")
    return freed
