"""Fault injection for the fault tests: ``MLX_DSVL_FAULT=POINT:N:ACTION[:RANK]``.

The ``N``-th time this process reaches ``fault_point(POINT)``, ``ACTION`` happens: ``KILL``,
``TERM``, ``HUP``, ``INT`` or ``STOP`` (a hung process) sends that signal to the process itself;
``ENOSPC`` raises ``OSError(ENOSPC)`` as a full disk would.  With ``RANK``, only the process
whose ``MLX_RANK`` it is.  Without the variable a fault point costs one dictionary lookup.

Points: ``step`` (training: a micro-batch computed, the step not yet counted or saved),
``checkpoint-file`` (a checkpoint's file written into its temporary folder: the adapters
pair, the optimizer, the RNG state, then ``state.json``), ``replace`` (a staged folder put in
place, e.g. by a ``--force`` run: 1 = it is complete, 2 = the old folder has been moved aside), ``tensor``
(conversion: a tensor written into the output's temporary folder).
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

ENV = "MLX_DSVL_FAULT"
_hits: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, n, action, *rank = spec.split(":")
    if point != name or (rank and os.environ.get("MLX_RANK", "0") != rank[0]):
        return
    _hits[name] += 1
    if _hits[name] != int(n):
        return
    if action == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), getattr(signal, f"SIG{action}"))
