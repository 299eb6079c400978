"""Data-parallel training over MLX's distributed backend (``mlx.launch``).

Each global batch (``batch_size`` x processes, in the order one process would take it) is cut into
one contiguous share per rank; summed token-weighted gradients divided by the step's tokens give
one process's gradient of the whole batch (up to float reassociation). Every decision is taken on
numbers the ranks share. A dead rank makes the others' next collective raise :class:`ProcessLost`;
a hung one is caught by the :class:`Watchdog`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .report import error

EXIT_LOST = 4  # the exit status of a process whose run lost another process
_BACKEND_ERROR = re.compile(r"^\[(ring|mpi|nccl|jaccl)\]")


class ProcessLost(RuntimeError):
    """Another process of the run failed, was killed or stopped answering."""


class Watchdog:
    """Ends this process when one wait for the others lasts over ``timeout`` seconds: a dead
    process makes the backend raise, but a hung one, or an unreachable machine, may never answer."""

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = float(timeout), rank
        self.explain: Callable[[], str] = lambda: ""
        self._since: float | None = None
        self._what = ""
        self._done = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="mlx-dsvl-watchdog").start()

    @contextmanager
    def waiting(self, what: str):
        self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                error(f"no answer from the other processes of the run for {self.timeout:g} s while waiting "
                      f"for {self._what} (a process hung, or its machine is unreachable); exiting"
                      f"{self.explain()}")
                os._exit(EXIT_LOST)


def fingerprint(facts: dict[str, Any]) -> mx.array:
    """Two int32 of the SHA-256 of each fact as JSON, by name (what the ranks compare)."""
    def one(value) -> np.ndarray:
        text = json.dumps(value, sort_keys=True, default=str).encode()
        return np.frombuffer(hashlib.sha256(text).digest()[:8], dtype=np.int32)

    return mx.array(np.concatenate([one(facts[k]) for k in sorted(facts)]))


class World:
    """This process's place in the run and the collectives training needs (local steps when alone)."""

    def __init__(self, group=None, timeout: float = 0):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.watchdog = Watchdog(timeout, self.rank) if self.size > 1 and timeout > 0 else None

    @classmethod
    def init(cls, timeout: float = 0) -> World:
        """The processes that ``mlx.launch`` started (or this one alone)."""
        group = mx.distributed.init()
        return cls(group if group.size() > 1 else None, timeout)

    @property
    def writer(self) -> bool:
        """This process writes the run's files and prints its progress."""
        return self.rank == 0

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()

    # -- data ------------------------------------------------------------------------------------
    def shard(self, batch: Sequence[int]) -> Sequence[int]:
        """This rank's contiguous share (of a short last batch: a nearly equal part, possibly none)."""
        n = len(batch)
        return batch[n * self.rank // self.size : n * (self.rank + 1) // self.size]

    # -- collectives -----------------------------------------------------------------------------
    @contextmanager
    def collective(self, what: str, watched: bool = True):
        """A lost process becomes :class:`ProcessLost`; waits on rank 0's writing go unwatched."""
        guard = self.watchdog.waiting(what) if watched and self.watchdog is not None else _nothing()
        try:
            with guard:
                yield
        except RuntimeError as e:
            if not _BACKEND_ERROR.match(str(e)):
                raise
            raise ProcessLost(f"lost the connection to another process of the run during {what} ({e}): "
                              f"it failed (see its error) or its machine is unreachable") from None

    def sum(self, values: Sequence[float], what: str, watched: bool = True) -> np.ndarray:
        """``values`` summed over the ranks (float32 on the wire: counts stay exact below 2**24)."""
        if self.size == 1:
            return np.asarray(values, dtype=np.float64)
        with self.collective(what, watched):
            out = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group)
            mx.eval(out)
        return np.array(out, dtype=np.float64)

    def max(self, value: float, what: str) -> float:
        """The largest ``value`` of any rank (e.g. a stop signal that reached any of them)."""
        if self.size == 1:
            return value
        with self.collective(what):
            out = mx.distributed.all_max(mx.array([value], dtype=mx.float32), group=self.group)
            mx.eval(out)
        return float(out.item())

    def barrier(self, what: str) -> None:
        """Wait for every rank (unwatched: e.g. while rank 0 writes a checkpoint)."""
        self.sum([0.0], what, watched=False)

    def gather(self, x: mx.array, what: str) -> mx.array:
        """``[size, *x.shape]``: every rank's ``x``."""
        if self.size == 1:
            return x[None]
        with self.collective(what, watched=False):
            out = mx.distributed.all_gather(x[None], group=self.group)
            mx.eval(out)
        return out

    def from_rank0(self, tree):
        """``tree`` as rank 0 has it, bit for bit (added to zeros)."""
        if self.size == 1:
            return tree
        with self.collective("rank 0's weights", watched=False):
            out = tree_map(lambda x: mx.distributed.all_sum(x if self.writer else mx.zeros_like(x),
                                                            group=self.group), tree)
            mx.eval(out)
        return out

    def average_gradients(self, grad):
        """The mean over the ranks (mlx's grouped all-reduce of small arrays)."""
        return nn.average_gradients(grad, group=self.group)

    def agree(self, facts: dict[str, Any]) -> None:
        """Raise if the ranks' set-ups differ. Unwatched: ranks may finish loading far apart."""
        if self.size == 1:
            return
        names = sorted(facts)
        rows = np.array(self.gather(fingerprint(facts), "the check that every process set up the same run"))
        for i, name in enumerate(names):
            col = rows[:, 2 * i : 2 * i + 2]
            odd = [r for r in range(self.size) if not np.array_equal(col[r], col[0])]
            if odd:
                raise ValueError(
                    f"the processes of this run differ in {name}: rank(s) {', '.join(map(str, odd))} "
                    f"differ from rank 0 (every host needs the same options, model, data and checkpoint "
                    f"at the same paths)")


SOLO = World()  # one process


def launcher() -> list[str]:
    """The command of this Python environment's ``mlx.launch`` (benchmarks and tests start it)."""
    script = Path(sys.executable).with_name("mlx.launch")
    found = str(script) if script.is_file() else shutil.which("mlx.launch")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


@contextmanager
def _nothing():
    yield


def global_batch_check(saved_batch: int, saved_size: int, batch: int, size: int) -> str | None:
    """Why a checkpoint cannot continue on ``size`` x ``batch`` (None: it can). The data order is that
    of the global batch, so any process count that keeps it continues exactly."""
    want = saved_batch * saved_size
    if batch * size == want:
        return None
    fix = (f"give `batch_size` {want // size}" if want % size == 0 else
           f"use a number of processes that divides {want}")
    return (f"the checkpoint was trained with a global batch of {want} ({saved_size} process(es) x "
            f"`batch_size` {saved_batch}), this run would take {batch * size} ({size} process(es) x "
            f"`batch_size` {batch}); the global batch must stay the same: {fix}")
