"""Stopping a run cleanly: SIGINT (Ctrl-C), SIGTERM and SIGHUP end it at a step boundary."""

from __future__ import annotations

import signal
import sys
import threading

from .report import who


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the run at the end of the current step, which
    is then saved; a second signal stops at once (``KeyboardInterrupt``), without saving.

    Handlers are installed only on the main thread (Python allows no other); elsewhere the run
    simply cannot be stopped by a signal.
    """

    def __init__(self):
        self.signum = 0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                sig = getattr(signal, name, None)  # no SIGHUP on Windows
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{who()}{self.name}: stopping after this step to save a checkpoint (once more: stop at "
              f"once, without saving)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
