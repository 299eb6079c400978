"""The first forward of a process on a GPU: a notice when it is slow.

MLX compiles GPU kernels the first time a process uses each (on CUDA through NVRTC, cached on disk
for later processes), which can take long on a fresh machine with nothing on the screen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import mlx.core as mx

MESSAGE = "preparing GPU kernels for this model (first use on this machine); later runs start faster"
NOTICE_DELAY_S = 2.0
_first_forward_done = False  # per process: compiled kernels stay loaded


def kernels_compile() -> bool:
    """Whether a first use compiles kernels: on a GPU (Metal, CUDA), not on MLX's CPU backend."""
    return mx.default_device() == mx.gpu


class FirstUseNotice:
    """Calls ``say(MESSAGE)`` once if the process's first forward on a GPU outlasts the delay;
    :meth:`done` at the first token."""

    def __init__(self, say: Callable[[str], None] | None):
        self._timer = None
        if say is not None and not _first_forward_done and kernels_compile():
            self._timer = threading.Timer(NOTICE_DELAY_S, say, args=(MESSAGE,))
            self._timer.daemon = True
            self._timer.start()

    def done(self) -> None:
        """The first token came: no notice any more, in this process."""
        global _first_forward_done
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            _first_forward_done = True

    def cancel(self) -> None:
        """Stop waiting without counting the first forward as done (it failed or was dropped)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __enter__(self) -> FirstUseNotice:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
