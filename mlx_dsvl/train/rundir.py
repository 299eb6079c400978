"""A run's output folder: never clobber an earlier run, replace one (``force``) atomically.

* A new or empty folder: the run writes there.
* The folder of the run being resumed: the run continues there.  Resuming from an earlier
  checkpoint than its newest drops the later ones (when the first new one is saved), so that
  needs ``force``.
* Any other non-empty folder is refused; with ``force`` a training run (not any other folder)
  is replaced: the new run writes into a hidden staging folder beside it, ``.OUT.new-PID``, and
  once that holds its first checkpoint the old run is renamed to ``.OUT.old-PID``, the staging
  folder to ``OUT``, and the old run removed.  Killed at any point, this leaves the old run or
  the new one with a checkpoint, never neither: the next run with the same folder finishes (or
  undoes) the swap of a dead writer and removes what it left (:func:`recover`).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from ..faults import fault_point
from .checkpoint import LATEST, checkpoint_root, list_checkpoints, run_of, step_of
from .files import fsync_dir, pid_alive, remove_abandoned

RUN_CONFIG = "run_config.json"


class OutputError(ValueError):
    """An output folder that this run must not write into; the message says what to do."""


def is_run(folder: Path) -> bool:
    return (folder / RUN_CONFIG).is_file() or checkpoint_root(folder).is_dir()


def _sibling(out: Path, kind: str, pid) -> Path:
    """The hidden folder ``.OUT.{kind}-PID`` beside ``out`` (resolved: ``.`` has no name)."""
    out = out.resolve()
    return out.parent / f".{out.name}.{kind}-{pid}"


def _leftovers(out: Path, kind: str):
    """``(pid, path)`` of the hidden ``.OUT.{kind}-PID`` folders whose writer is gone."""
    pattern = _sibling(out, kind, "*")
    for p in pattern.parent.glob(glob.escape(pattern.name[:-1]) + "*"):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            yield pid, p


def recover(out: Path) -> None:
    """Finish or undo what a killed replacement of ``out`` left behind (see the module doc)."""
    if not out.resolve().parent.is_dir():
        return
    for pid, old in _leftovers(out, "old"):
        new = _sibling(out, "new", pid)
        if not out.exists() and new.is_dir():  # killed between the two renames
            os.rename(new, out)
            print(f"note: completed the interrupted replacement of {out}", file=sys.stderr)
        elif not out.exists():
            os.rename(old, out)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    for _, new in _leftovers(out, "new"):
        shutil.rmtree(new, ignore_errors=True)
        print(f"note: removed {new}, an unfinished replacement of {out} (its run was killed before "
              f"taking {out}'s place; {out} is unchanged)", file=sys.stderr)


def _describe(out: Path) -> str:
    steps = list_checkpoints(out)
    return f"checkpoints up to step {step_of(steps[-1])}" if steps else "no checkpoint"


class RunDir:
    """Where a run writes: ``path`` is ``out`` itself, or a staging folder until :meth:`publish`."""

    def __init__(self, out: Path, staging: Path | None = None):
        self.out = out
        self.path = staging or out

    @property
    def staged(self) -> bool:
        return self.path != self.out

    @classmethod
    def open(cls, out: Path, force: bool, resume: Path | None = None) -> RunDir:
        """Decide where a run into ``out`` writes (``resume``: the checkpoint it continues)."""
        recover(out)
        if out.exists() and not out.is_dir():
            raise OutputError(f"`out` {out} is a file, not a folder")
        if not out.exists() or not any(out.iterdir()):
            return cls(out)
        own = resume is not None and run_of(resume) is not None and run_of(resume).resolve() == out.resolve()
        if own:
            later = [step_of(p) for p in list_checkpoints(out) if step_of(p) > step_of(resume)]
            if later and not force:
                raise OutputError(
                    f"`out` {out} has checkpoints after step {step_of(resume)} (up to step "
                    f"{max(later)}); continuing from step {step_of(resume)} there drops them: add "
                    f"`force` to do so, or give another `out`")
            return cls(out)
        if not is_run(out):
            raise OutputError(f"`out` {out} is not empty and holds no training run; choose a new or "
                              f"empty folder")
        if not force:
            raise OutputError(
                f"`out` {out} holds an earlier training run ({_describe(out)}): continue it with "
                f"`resume` {out}, or replace it with `force` (it is kept until the new run saves "
                f"its first checkpoint)")
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise OutputError(f"`force` cannot replace {out}: it holds the current folder; run from "
                              f"another folder")
        return cls(out, _sibling(out, "new", os.getpid()))

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.path)  # temporary files of a killed earlier run here

    def publish(self) -> bool:
        """Swap a staging folder that now holds a checkpoint into place; True if it moved."""
        if not self.staged:
            return False
        assert (checkpoint_root(self.path) / LATEST).is_file()
        fault_point("replace")
        old = self._old()
        os.rename(self.out, old)
        fault_point("replace")
        os.rename(self.path, self.out)
        fsync_dir(self.out.parent)
        self.path = self.out
        shutil.rmtree(old, ignore_errors=True)
        return True

    def _old(self) -> Path:
        return _sibling(self.out, "old", os.getpid())

    def abandon(self) -> None:
        """Drop an unpublished staging folder (the run failed or stopped before a checkpoint)."""
        if not self.staged:
            return
        if not self.out.exists() and self._old().is_dir():  # interrupted between the renames
            os.rename(self._old(), self.out)
        shutil.rmtree(self.path, ignore_errors=True)
