"""Which folder a run writes into: never clobber an earlier run, replace one (``force``) atomically.

A resumed run continues in its folder (from an earlier checkpoint than the newest, which drops the
later ones, only with ``force``). Any other non-empty folder is refused; with ``force`` a training
run is replaced by a folder staged beside it that swaps in at its first checkpoint, so a kill at
any point leaves the old run or the new one with a checkpoint, never neither.
"""

from __future__ import annotations

from pathlib import Path

from ..outputs import Staged, log, reclaim_stale, remove_abandoned
from .checkpoint import LATEST, checkpoint_root, list_checkpoints, run_of, step_of

RUN_CONFIG = "run_config.json"


class OutputError(ValueError):
    """An output folder that this run must not write into; the message says what to do."""


def is_run(folder: Path) -> bool:
    return (folder / RUN_CONFIG).is_file() or checkpoint_root(folder).is_dir()


def recover(out: Path) -> None:
    """Finish or undo what a killed replacement of ``out`` left behind."""
    reclaim_stale(out, log, f"unfinished replacements of {Path(out).name}")


def _describe(out: Path) -> str:
    steps = list_checkpoints(out)
    return f"checkpoints up to step {step_of(steps[-1])}" if steps else "no checkpoint"


class RunDir:
    """Where a run writes: ``path`` is ``out`` itself, or a staged folder until :meth:`publish`."""

    def __init__(self, out: Path, staging: Staged | None = None):
        self.out = out
        self._staging = staging
        self.path = staging.partial if staging else out

    @property
    def staged(self) -> bool:
        return self._staging is not None

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
        return cls(out, Staged(out))

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.path)  # temporary files of a killed earlier run here

    def publish(self) -> bool:
        """Put a staged folder that now holds a checkpoint in ``out``'s place; True if it moved."""
        if self._staging is None:
            return False
        assert (checkpoint_root(self.path) / LATEST).is_file()
        self._staging.publish()
        self._staging.release()
        self._staging, self.path = None, self.out
        return True

    def abandon(self) -> None:
        """Drop an unpublished staged folder (the run failed or stopped before a checkpoint)."""
        if self._staging is not None:
            self._staging.abandon()
            self._staging = None
