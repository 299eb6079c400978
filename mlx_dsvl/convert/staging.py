"""Output folders that appear whole or not at all, even when the writer is killed.

:func:`staged_output` writes into a hidden ``.OUT.partial-XXXX`` folder beside ``--out`` and
renames it into place at the end.  Next to it, ``.OUT.partial-XXXX.lock`` holds an exclusive
``flock`` for the writer's lifetime: the kernel drops the lock when the process dies, however it
dies (``kill -9`` included), so a later run can tell a dead writer's leftovers from a live
writer's work without trusting pids.  :func:`reclaim_stale` removes the leftovers of dead writers
(and puts back an old ``--out`` whose ``--force`` replacement was cut between its two renames).

SIGTERM and SIGHUP are turned into :class:`Terminated` by :func:`signals_as_exceptions`, so they
clean up like Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .files import ConvertError, folder_bytes, human_bytes, log

try:
    import fcntl
except ImportError:  # Windows: no flock; staging still works, reclaiming is left to the user
    fcntl = None

LOCK = ".lock"
FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # disk full, quota exceeded


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
    """Run a command's ``work()``: SIGTERM/SIGHUP clean up like Ctrl-C, and ``errors``, Ctrl-C
    and those signals are one ``error:`` line.  Returns (exit status, the result or None)."""
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


def check_output(out: Path, source: Path | None, force: bool) -> None:
    """Refuse an existing ``out`` without ``force``, a file, and any overlap with the source."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to replace it)")
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or src in dst.parents or dst in src.parents:
            raise ConvertError(f"{out}: the output folder must not be, contain or lie inside the input {source}")


def _names(out: Path, suffix: str):
    """(partial folder, its lock file, the old --out during a --force replace) for one writer."""
    partial = out.parent / f".{out.name}.partial-{suffix}"
    return partial, partial.with_name(partial.name + LOCK), out.parent / f".{out.name}.old-{suffix}"


def _claim(out: Path) -> tuple:
    """Create and lock this writer's lock file; returns (fd, suffix)."""
    while True:
        fd, lock = tempfile.mkstemp(prefix=f".{out.name}.partial-", suffix=LOCK, dir=out.parent)
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner looks at this very file
        except OSError:  # a filesystem without locks: write anyway; later runs leave it alone
            break
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # still ours: a cleaner that took the lock first would have removed it
        os.close(fd)
    return fd, Path(lock).name[len(f".{out.name}.partial-"):-len(LOCK)]


def reclaim_stale(out: Path, progress: Callable[[str], None] = log) -> int:
    """Remove what killed writers into ``out`` left behind; returns the bytes freed.

    Only folders whose lock nobody holds are touched: a live writer's never are.  An old ``out``
    moved aside by an interrupted ``--force`` replace is renamed back when ``out`` is missing.
    """
    out = Path(out).absolute()
    if fcntl is None or not out.parent.is_dir():
        return 0
    freed, count = 0, 0
    prefix = f".{out.name}.partial-"
    for lock in sorted(out.parent.glob(glob.escape(prefix) + "*" + LOCK)):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            except OSError as e:  # no locks on this filesystem: cannot tell, so leave it
                progress(f"note: cannot check whether {lock.name[:-len(LOCK)]} is still being written "
                         f"({e.strerror}); delete it yourself if no conversion into {out.name} is running")
                continue
            partial, _, old = _names(out, lock.name[len(prefix):-len(LOCK)])
            if old.is_dir() and not out.exists():
                old.rename(out)
                progress(f"restored {out}: a --force replacement of it was interrupted")
            for d in (old, partial):
                if d.is_dir():
                    freed += folder_bytes(d)
                    count += 1
                    shutil.rmtree(d, ignore_errors=True)
            os.unlink(lock)
        finally:
            os.close(fd)
    if count:
        progress(f"removed {count} partial folder(s) of interrupted conversions into {out.name}: "
                 f"{human_bytes(freed)} freed")
    for d in sorted(out.parent.glob(glob.escape(prefix) + "*")):
        if d.is_dir() and not d.with_name(d.name + LOCK).exists():
            progress(f"note: {d} ({human_bytes(folder_bytes(d))}) has no lock file (left by an older "
                     "version?); delete it yourself if no conversion into this folder is running")
    return freed


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False, progress: Callable[[str], None] = log) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; rename it to ``out`` when the block succeeds.

    On failure (any exception, Ctrl-C, SIGTERM/SIGHUP under :func:`signals_as_exceptions`) the
    temporary folder and the parent folders created for it are removed and ``out`` is left as it
    was; after ``kill -9``, the next run into ``out`` removes them (:func:`reclaim_stale`).
    """
    out = Path(out).absolute()
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise ConvertError(f"{out}: {parent} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale(out, progress)
        fd, suffix = _claim(out)
    except OSError as e:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise ConvertError(f"{out}: cannot write there ({e.strerror or e})") from None
    tmp, lock, old = _names(out, suffix)
    try:
        tmp.mkdir(mode=0o700)
        yield tmp
        tmp.chmod(0o755)  # a model folder is an ordinary one
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists():
            if not force:
                raise ConvertError(f"{out}: already exists (use --force to replace it)")
            out.rename(old)  # a kill from here to the next rename: reclaim_stale puts it back
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the folder first, then its lock: never the reverse
        lock.unlink(missing_ok=True)
        for d in created:  # innermost first; only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OSError) and e.errno in FULL:
            raise ConvertError(f"{out.parent}: no space left on the device while writing {out.name} "
                               "(the partial output was removed; free some space and run again)") from None
        raise
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
