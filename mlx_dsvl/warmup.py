"""The first forward of a process on a GPU: a notice when it is slow, and a warm-up.

MLX compiles GPU kernels the first time a process uses each of them (on CUDA through NVRTC,
cached on disk for later processes).  With a 4-bit LLM that took over a minute on a fresh
machine, with nothing on the screen.  :class:`FirstUseNotice` says what is happening when the
first forward of the process has not produced its token after :data:`NOTICE_DELAY_S`; the CLI
and the bench print it, the app shows it in its loading spinner and warms the model up
(:func:`warm_up`) right after loading, so that the first question does not pay for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import mlx.core as mx

MESSAGE = "preparing GPU kernels for this model (first use on this machine); later runs start faster"
NOTICE_DELAY_S = 2.0
_first_forward_done = False  # per process: compiled kernels stay loaded


def kernels_compile() -> bool:
    """Whether a first use compiles kernels: on a GPU (Metal, CUDA), not on MLX's CPU backend."""
    return mx.default_device() == mx.gpu


class FirstUseNotice:
    """Calls ``say(MESSAGE)`` once if the process's first forward on a GPU outlasts the delay.

    Start it before the work (images, prefill) and call :meth:`done` at the first token; it is
    a no-op for every later forward, on the CPU, or with ``say=None``.  Also a context manager.
    """

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


def warm_up(model, processor, say: Callable[[str], None] | None = None) -> float:
    """On a GPU, run a short throw-away chat so that a conversation's kernels are compiled:
    the vision towers, an image prompt's prefill, follow-up prefills of 4 lengths (4-bit
    matmuls compile one kernel per range of token counts), sampling and decoding.

    Returns the seconds it took (0.0 on the CPU backend, where nothing is compiled).  ``say``
    gets :data:`MESSAGE` if the first forward is slow.
    """
    if not kernels_compile():
        return 0.0
    from PIL import Image

    from .session import ChatSession

    tic = time.perf_counter()
    chat = ChatSession(model, processor, on_truncate=None, on_slow_start=say)
    tag = processor.image_tag
    turns = [(tag + "Describe the image.", [Image.new("RGB", (64, 48), (128, 128, 128))])]
    turns += [(" ".join(["word"] * n), []) for n in (8, 24, 48, 100)]
    for text, images in turns:
        for _ in chat.send(text, images, max_tokens=3):
            pass
    return time.perf_counter() - tic
